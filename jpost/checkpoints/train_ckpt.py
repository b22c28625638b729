"""Train checkpoints: orbax `CheckpointManager`, async, keep-N, atomic.

One checkpoint = the train state (params, optimiser, RNG, objective state, counters), the data
iterator state of every process and a small JSON `meta` (config fingerprint, step). Orbax writes to
a temporary directory and renames it on commit, so a process killed mid-save leaves the previous
checkpoint as the latest complete one. Only orbax's array format and JSON are read back: no pickle.

LoRA runs (`params = {"lm": frozen base, "lora": adapters, heads}`) save only what trains: when
`meta` holds `FROZEN_BASE` (the fingerprint of `params["lm"]`, `base_fingerprint`), the state is
written without `params["lm"]`, and a restore puts back the base the resuming run built from its
config, after checking its fingerprint (`restore(..., base=)`). Readers of such a checkpoint
outside a run (`load_params`) rebuild the base from the run's config.json the same way
(`jpost.train.loop.lora_base`). Checkpoints of LoRA runs written before this (with `lm`) restore
as they are.

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

from jpost.checkpoints import fingerprint

log = logging.getLogger(__name__)


# meta key of a LoRA run's checkpoints: the fingerprint of its frozen base (`base_fingerprint`),
# whose arrays (`params["lm"]`) the checkpoint leaves out.
FROZEN_BASE = "frozen_base"


_RESUME_HINT = ("A LoRA checkpoint holds the adapters only: the resuming run must rebuild the "
                "same base (model.init files, lora.quantize), or use a new --workdir")


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
    """Saves (async); every process calls it at the same step with its own `data_state`.

    With `meta[FROZEN_BASE]` (LoRA runs) the frozen `params["lm"]` is left out.
    """
    states = gather_json(data_state)
    if FROZEN_BASE in meta:
      state = _without_base(state)
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave({"process_count": len(states), "per_process": states}),
            meta=ocp.args.JsonSave(meta)),
        force=force)

  def restore(self, step: int, abstract_state, expected_meta: dict, *, base=None):
    """Restores into the shardings of `abstract_state` (ShapeDtypeStruct leaves with sharding).

    `expected_meta` holds what must match for an exact resume (model, objective, shapes): a
    mismatch is an error naming the field, not a silently different run. `base`: a LoRA run's
    live `params["lm"]`, put into the state of a checkpoint saved without it once its
    fingerprint matches `expected_meta[FROZEN_BASE]`. Returns (state, the data iterator states
    of the saving run's processes, in process order, meta).
    """
    where = f"{self.directory}/{step}"
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    for key, want in expected_meta.items():
      if key != FROZEN_BASE and key in meta and meta[key] != want:
        raise IncompatibleCheckpoint(
            f"{where}: checkpoint has {key}={meta[key]!r} but this run has "
            f"{key}={want!r}; use a new --workdir or make the config match")
    adapter_only = FROZEN_BASE in meta
    if adapter_only:
      if FROZEN_BASE not in expected_meta:
        raise IncompatibleCheckpoint(
            f"{where}: an adapter-only LoRA checkpoint (no params['lm']), but this run has no "
            "LoRA adapters (lora.rank = 0); use a new --workdir or the checkpoint's lora settings")
      if base is None:
        raise ValueError(f"{where}: restoring an adapter-only checkpoint needs base=params['lm']")
      check_base(where, meta[FROZEN_BASE], expected_meta[FROZEN_BASE], _RESUME_HINT)
      abstract_state = _without_base(abstract_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise IncompatibleCheckpoint(
          f"{self.directory}/{step}: the saved train state does not fit this run's state "
          f"(different model, optimiser or objective?): {e}") from e
    data = restored.data
    state = restored.state
    if adapter_only:
      state = _with_base(state, base)
    elif FROZEN_BASE in expected_meta:
      # A LoRA checkpoint written with its base: restored as it is, once that base is the one
      # this run built (later, adapter-only saves name this run's base).
      check_base(where, base_fingerprint(_params(state)["lm"], "params['lm'] in the checkpoint"),
                 expected_meta[FROZEN_BASE], _RESUME_HINT)
    # Checkpoints from before per-process states hold one process's state itself.
    return state, data["per_process"] if "per_process" in data else [data], meta

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _params(state):
  return state["params"] if isinstance(state, dict) else state.params


def _replace_params(state, params):
  return dict(state, params=params) if isinstance(state, dict) else state.replace(params=params)


def _without_base(state):
  """The state (a TrainState or a dict with 'params') without `params['lm']`."""
  return _replace_params(state, {k: v for k, v in _params(state).items() if k != "lm"})


def _with_base(state, base):
  return _replace_params(state, dict(_params(state), lm=base))


def base_fingerprint(lm, source: str) -> dict:
  """{"source": how the run built the base (shown in errors, not compared), "leaves": {path:
  "dtype[shape] hash"}} of a LoRA run's frozen base (device or host arrays)."""
  paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(lm))
  lanes = fingerprint.host_lanes(list(leaves))   # jpost/checkpoints/fingerprint.py
  return {"source": source, "leaves": {
      "/".join(str(getattr(k, "key", k)) for k in path):
      f"{np.dtype(x.dtype).name}{list(x.shape)} {int(h1):08x}{int(h2):08x}"
      for path, x, (h1, h2) in zip(paths, leaves, lanes)}}


def check_base(where: str, saved: dict, current: dict, hint: str):
  """IncompatibleCheckpoint naming the differing leaves when the frozen base `current` is not
  the one the adapters of the checkpoint `where` were trained on (fingerprint `saved`)."""
  old, new = saved["leaves"], current["leaves"]
  if old == new:
    return
  diffs = [f"{k}: {old.get(k, 'absent')} -> {new.get(k, 'absent')}"
           for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  raise IncompatibleCheckpoint(
      f"{where}: the LoRA adapters were trained on another frozen base (checkpoint: "
      f"{saved['source']}; now: {current['source']}); {len(diffs)} of {len(old)} base arrays "
      f"differ: " + "; ".join(diffs[:4]) + (f"; ... ({len(diffs) - 4} more)" if len(diffs) > 4
                                            else "") + f". {hint}")


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
  The checkpoint of a LoRA run holds no base: it is rebuilt from the run's config.json, as the
  run built it (`jpost.train.loop.lora_base`, on one device), and must match the fingerprint
  saved with the adapters.
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
  params = restored.state["params"]
  adapter_only = "lora" in params and "lm" not in params
  if adapter_only:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  manager.close()
  if adapter_only:
    params = dict(params, lm=_rebuilt_base(directory, step, meta))
  log.info("loaded params from %s step %d", directory, step)
  return params


def _rebuilt_base(directory, step: int, meta: dict):
  """The frozen base an adapter-only checkpoint left out, rebuilt from the run's config.json."""
  import ml_collections
  from jpost import models
  from jpost.train import loop   # imports this module: imported when needed
  where = f"{directory}/{step}"
  workdir = epath.Path(directory).parent
  if FROZEN_BASE not in meta:
    raise IncompatibleCheckpoint(f"{where}: LoRA adapters without their base (params['lm']) "
                                 f"and without its fingerprint in meta ({sorted(meta)})")
  try:
    cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    model_cfg = models.read_model_config_json(os.fspath(workdir / "model_config.json"))
    # On the host: the caller may be inside a run's mesh (`model.init=ckpt:`), which the
    # fingerprint's jit would not accept one-device arrays under.
    lm = jax.device_get(loop.lora_base(cfg, model_cfg))
  except (OSError, ValueError) as e:
    raise IncompatibleCheckpoint(
        f"{where}: the checkpoint holds LoRA adapters only; rebuilding their frozen base from "
        f"{workdir}/config.json (model.init, lora.quantize) failed: {e}") from e
  check_base(where, meta[FROZEN_BASE], loop.base_fingerprint(cfg, lm),
             f"The checkpoint holds the adapters only and its base is rebuilt from "
             f"{workdir}/config.json: restore the files it names (model.init)")
  return lm


def config_fingerprint(cfg_dict: dict) -> str:
  return json.dumps(cfg_dict, sort_keys=True)
