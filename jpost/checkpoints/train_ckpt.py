"""Train checkpoints: orbax `CheckpointManager`, async, keep-N, atomic.

One checkpoint = the train state (params, optimiser, RNG, objective state, counters), the data
iterator state and a small JSON `meta` (config fingerprint, step). Orbax writes to a temporary
directory and renames it on commit, so a process killed mid-save leaves the previous checkpoint as
the latest complete one. Only orbax's array format and JSON are read back: no pickle.
"""
import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class IncompatibleCheckpoint(ValueError):
  pass


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    return self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=ocp.args.JsonSave(data_state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, abstract_state, expected_meta: dict):
    """Restores into the shardings of `abstract_state` (ShapeDtypeStruct leaves with sharding).

    `expected_meta` holds what must match for an exact resume (model, objective, shapes): a
    mismatch is an error naming the field, not a silently different run.
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
    return restored.state, restored.data, meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def find_checkpoint_dir(path: str) -> str:
  """Accepts a workdir (with checkpoints/) or a checkpoints directory itself."""
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def load_params(path: str):
  """Params of the latest checkpoint under `path` (for `model.init=ckpt:PATH`, scoring, export),
  as host numpy arrays.

  Reads only the params (not the optimiser state) and restores them as numpy arrays, so neither
  the source run's optimiser nor its device topology has to match this process: a checkpoint
  written by 8 devices loads on 1 (restoring into the saved shardings would need the same mesh).
  """
  directory = find_checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"model.init=ckpt:{path}: no such directory")
  manager = ocp.CheckpointManager(directory,
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
