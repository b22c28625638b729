"""Host values and batch rows across the processes of one run (`jax.distributed`).

The online loop keeps each rollout on the process that owns its prompt: a prompt's G samples are
sampled, scored and turned into advantages there, because group statistics need the whole group.
What every process must agree on goes through the reductions here: logged metrics (sums and counts,
then means), batch-wide statistics (PPO's advantage whitening, GRPO's batch-scaled std), the loss's
subset token counts and DAPO's refill decision. With one process they are plain numpy and run no
collective.

Device arrays: a process passes its own rows, `jax.make_array_from_process_local_data` puts them
where its devices hold the batch axis, `own_rows(x)` says which block of global rows that is, and
`local_rows(x, rows)` reads those rows back from any global array whose local shards cover them.
"""
import dataclasses
import math
import zlib

import jax
import numpy as np


# ---------------------------------------------------------------------------------- host values

def gather(x) -> np.ndarray:
  """[process_count, *x.shape]: every process's `x`, in process order.

  Every process must pass the same shape and dtype. The bytes travel as uint8, so float64 and
  int64 values arrive exactly (a plain allgather narrows them to 32 bits without
  jax_enable_x64).
  """
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return x[None]
  if x.size == 0:
    return np.zeros((jax.process_count(),) + x.shape, x.dtype)
  from jax.experimental import multihost_utils
  raw = np.asarray(multihost_utils.process_allgather(x.reshape(-1).view(np.uint8)))
  return np.ascontiguousarray(raw).view(x.dtype).reshape((-1,) + x.shape)


def total(x) -> np.ndarray:
  """The sum of `x` over processes."""
  return gather(x).sum(axis=0)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on at least one."""
  return bool(gather(np.asarray(bool(flag))).any())


@dataclasses.dataclass(frozen=True)
class Totals:
  """Global (sum, count) per name, from `Tally.reduce`."""
  sums: dict

  def sum(self, name) -> float:
    return float(self.sums[name][0])

  def count(self, name) -> float:
    return float(self.sums[name][1])

  def mean(self, name) -> float:
    """The mean of every value added under `name` on every process; 0 when there were none."""
    s, n = self.sums[name]
    return float(s / n) if n else 0.0

  def std(self, name) -> float:
    """Population std of the values (added with squares=True); 0 when there were none."""
    return math.sqrt(max(self.mean(name + "**2") - self.mean(name) ** 2, 0.0))


class Tally:
  """Named sums and counts added on each process, summed over all processes in one collective.

  Every process must add the same names (an empty array adds a count of 0), so that the vectors
  line up; `reduce` checks this and names the difference instead of mixing up metrics.
  """

  def __init__(self):
    self._sums = {}

  def add(self, name: str, values, *, squares: bool = False):
    v = np.asarray(values, np.float64).reshape(-1)
    self.add_sum(name, float(v.sum()), v.size)
    if squares:
      self.add_sum(name + "**2", float((v * v).sum()), v.size)

  def add_sum(self, name: str, value: float, count: float):
    s = self._sums.setdefault(name, [0.0, 0.0])
    s[0] += float(value)
    s[1] += float(count)

  def reduce(self) -> Totals:
    names = sorted(self._sums)
    fingerprint = zlib.crc32("\n".join(names).encode())
    local = np.array([fingerprint] + [x for n in names for x in self._sums[n]], np.float64)
    got = gather(local)
    if (got[:, 0] != fingerprint).any():
      raise RuntimeError(f"processes tallied different metrics (process "
                         f"{jax.process_index()} has {names}): every process must add every name")
    sums = got[:, 1:].sum(axis=0).reshape(-1, 2)
    return Totals({n: (float(s), float(c)) for n, (s, c) in zip(names, sums)})


# --------------------------------------------------------------------------- rows of device arrays

def own_rows(x: jax.Array) -> slice:
  """The block of rows (first axis) of a global array that this process's devices hold."""
  if x.is_fully_addressable:
    return slice(0, x.shape[0])
  spans = sorted({s.index[0].indices(x.shape[0])[:2] for s in x.addressable_shards})
  lo, hi = spans[0][0], spans[0][1]
  for a, b in spans[1:]:
    if a > hi:
      raise ValueError(f"process {jax.process_index()} holds rows {spans} of a "
                       f"{x.shape[0]}-row array: not one block")
    hi = max(hi, b)
  return slice(lo, hi)


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
  """Rows `rows` of a global array, read from this process's shards (which must cover them)."""
  if x.is_fully_addressable:
    return np.asarray(x)[rows]
  lo, hi = rows.start, rows.stop
  out = np.zeros((hi - lo,) + x.shape[1:], x.dtype)
  covered = np.zeros(out.shape, bool)
  for shard in x.addressable_shards:
    a, b, _ = shard.index[0].indices(x.shape[0])
    start, stop = max(a, lo), min(b, hi)
    if start >= stop:
      continue
    where = (slice(start - lo, stop - lo),) + tuple(shard.index[1:])
    out[where] = np.asarray(shard.data)[start - a:stop - a]
    covered[where] = True
  if not covered.all():
    raise ValueError(f"process {jax.process_index()}'s shards of a {x.shape} array do not cover "
                     f"rows [{lo}, {hi})")
  return out


def place_rows(local: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
  """This process's rows -> the global array of all processes' rows (process order on a
  process-major mesh), split over its first axis by `sharding`."""
  local = np.asarray(local)
  global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
