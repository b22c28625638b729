"""Train checkpoints: orbax `CheckpointManager`, async, keep-N, atomic.

One checkpoint = the train state (params, optimiser, RNG, objective state, counters), the data
iterator state of every process and a small JSON `meta` (config fingerprint, step). Orbax writes to
a temporary directory and renames it on commit, so a process killed mid-save leaves the previous
checkpoint as the latest complete one. Only orbax's array format and JSON are read back: no pickle.

Multi-process: every process writes its shards of the state; JSON items are written by process 0
alone, so the data iterator states are gathered to it first (`data` = {"process_count": P,
"per_process": [state of process 0, ..., P - 1]}). Directories go through `etils.epath`, so a
`gs://` checkpoint directory is handled by orbax's own GCS support.
"""
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
  pass


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    path = _absolute(directory)
    self.directory = str(path)
    self.manager = ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Saves (async); every process calls it at the same step with its own `data_state`."""
    states = gather_json(data_state)
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": len(states), "per_process": states}),
            meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, abstract_state, expected_meta: dict):
    """Restores into the shardings of `abstract_state` (ShapeDtypeStruct leaves with sharding).

    `expected_meta` holds what must match for an exact resume (model, objective, shapes): a
    mismatch is an error naming the field, not a silently different run. Returns (state, the data
    iterator states of the saving run's processes, in process order, meta).
    """
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, want in expected_meta.items():
      if key in meta and meta[key] != want:
        raise IncompatibleCheckpoint(
            f"{self.directory}/{step}: checkpoint has {key}={meta[key]!r} but this run has "
            f"{key}={want!r}; use a new --workdir or make the config match")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise IncompatibleCheckpoint(
          f"{self.directory}/{step}: the saved train state does not fit this run's state "
          f"(different model, optimiser or objective?): {e}") from e
    data = restored.data
    # Checkpoints from before per-process states hold one process's state itself.
    return restored.state, data["per_process"] if "per_process" in data else [data], meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _absolute(path) -> epath.Path:
  """Local paths made absolute (orbax wants them so); gs:// and other URIs as they are."""
  path = epath.Path(path)
  return path if "://" in os.fspath(path) else epath.Path(os.path.abspath(path))


def gather_json(obj) -> list:
  """[obj of process 0, ..., obj of process P - 1] on every process (a collective when P > 1)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(row[:n].tobytes()) for row, n in zip(rows, sizes)]


def find_checkpoint_dir(path: str) -> str:
  """Accepts a workdir (with checkpoints/) or a checkpoints directory itself."""
  sub = epath.Path(path) / "checkpoints"
  return str(sub) if sub.is_dir() else str(path)


def load_params(path: str):
  """Params of the latest checkpoint under `path` (for `model.init=ckpt:PATH`, scoring, export),
  as host numpy arrays.

  Reads only the params (not the optimiser state) and restores them as numpy arrays, so neither
  the source run's optimiser nor its device topology has to match this process: a checkpoint
  written by 8 devices loads on 1 (restoring into the saved shardings would need the same mesh).
  """
  directory = find_checkpoint_dir(path)
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"model.init=ckpt:{path}: no such directory")
  manager = ocp.CheckpointManager(_absolute(directory),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                 "data": ocp.JsonCheckpointHandler(),
                                                 "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    manager.close()
    raise FileNotFoundError(f"model.init=ckpt:{path}: no complete checkpoint in {directory}")
  saved = manager.item_metadata(step)["state"]["params"]
  target = {"params": jax.tree.map(lambda m: np.zeros((), m.dtype), saved)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=target, restore_args=restore_args, partial_restore=True)))
  manager.close()
  log.info("loaded params from %s step %d", directory, step)
  return restored.state["params"]


def config_fingerprint(cfg_dict: dict) -> str:
  return json.dumps(cfg_dict, sort_keys=True)
