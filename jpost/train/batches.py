"""Host batches -> device: stacking micro-batches, placing them on the mesh, eval denominators."""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def stack(micro_batches):
  """k micro-batch dicts -> one dict with a leading [k] axis (the accumulation axis)."""
  return {k: np.stack([mb[k] for mb in micro_batches]) for k in micro_batches[0]}


def to_device(batch, mesh, batch_axis=None):
  """Places a host batch on the mesh, rows split over the data-parallel axes.

  Each process passes its own rows; `make_array_from_process_local_data` assembles the global
  array. `batch_axis` defaults to 1 for stacked [k, b, ...] batches (leaves with >= 2 dims whose
  first dim is the accumulation axis) and must be given for unstacked ones.
  """
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = global_seq_index(batch, jax.process_index(), jax.process_count())
  out = {}
  for name, x in batch.items():
    x = np.asarray(x)
    axis = batch_axis if batch_axis is not None else (1 if x.ndim >= 2 else None)
    spec = [None] * x.ndim
    if axis is not None and x.ndim > axis and (x.shape[axis] * jax.process_count()) % dp == 0:
      spec[axis] = DATA_AXES
    elif jax.process_count() > 1 and axis is not None and x.ndim > axis:
      raise ValueError(f"batch field {name!r} has {x.shape[axis]} rows per process, not "
                       f"divisible across {dp} data-parallel devices")
    sharding = NamedSharding(mesh, P(*spec))
    global_shape = list(x.shape)
    if axis is not None and x.ndim > axis and spec[axis] is not None:   # scalars: replicated
      global_shape[axis] *= jax.process_count()
    out[name] = jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))
  return out


def global_seq_index(batch, process_index: int, process_count: int):
  """Renumbers `*seq_index` from per-process slots [0, S_local) to global ones.

  The data pipeline numbers each process's examples from 0; in the assembled global array
  process p's examples are slots [p * S_local, (p + 1) * S_local), so without the offset sums
  over examples (sequence sums, last-token heads, greedy accuracy) would mix processes.
  """
  if process_count == 1 or "example_valid" not in batch:
    return batch
  offset = process_index * np.shape(batch["example_valid"])[-1]
  return {k: np.where(np.asarray(v) >= 0, np.asarray(v) + offset, v) if k.endswith("seq_index")
          else v for k, v in batch.items()}


def with_eval_denominators(eval_batches, denom_unit: str):
  """Writes the totals of the whole eval set into each batch so summed metrics are exact means."""
  if not eval_batches:
    return []
  tokens = max(sum(float(np.sum(b["loss_mask"])) for b in eval_batches), 1.0)
  examples = sum(float(np.sum(b["example_valid"])) for b in eval_batches)
  if denom_unit == "pairs":
    examples /= 2
  examples = max(examples, 1.0)
  return [dict(b, denom_tokens=np.float32(tokens), denom_examples=np.float32(examples))
          for b in eval_batches]
