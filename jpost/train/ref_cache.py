"""`ref.precompute`: the reference model's sequence log-probs, computed once per dataset.

Objectives that use the frozen reference only through S_ref(y), the sum of its log-probs over an
example's loss tokens (the DPO family, BCO, the implicit PRM), can read it from a table instead of
running the reference in every step (ALGORITHMS.md §2: "both must give the same loss"). Before
training, one pass over the training set with the reference params fills a table
[num_examples, sequences per example] (pairs: chosen, rejected); each training batch then gets
`ref_seq_logp` [S] by looking up its slots' `example_id` (jpost/data/batching.py), which
`forward.compute_logps` hands to the loss as `logps['ref_seq']`. The step never touches the
reference params, so the loop drops them: one model fewer in device memory, one forward fewer per
step. The eval batches (a fixed list) get the same treatment, batch by batch.

Tables live in `<workdir>/ref_cache/<key>.npz` (plain arrays, loaded with allow_pickle=False).
The key hashes everything the values depend on: the encoded dataset (token ids, loss masks,
sequence boundaries) and the data settings and tokenizer that produced it, the model config, and
a fingerprint of the reference params' bytes. A different dataset, tokenizer or reference
therefore gets a new file instead of a stale table; a resumed run finds its own.

Not precomputable, and refused with the reason: full-vocabulary KL objectives (need the
reference's whole distribution at every token) and KTO (its reference point z uses mismatched
rows, completion i after the prompt of whichever example follows it in the *shuffled batch*, so
the set of rows to score changes every epoch). Reference-free objectives (simpo, orpo, rm_bt)
need no reference at all: precompute is a no-op for them.
"""
import hashlib
import io
import json
import logging
import os
import time

import jax
import numpy as np
from etils import epath

from jpost.checkpoints import fingerprint
from jpost.data import batching
from jpost.losses import common
from jpost.train import batches as tbatches
from jpost.train import forward

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Data settings that change the encoded sequences (the encoded ids are hashed too; these make the
# key follow the documented identity: which data, encoded how, with which tokenizer).
_DATA_KEYS = ("tokenizer", "chat_template", "loss_on", "max_len", "overlong", "max_prompt_len")


class PrecomputeUnsupported(ValueError):
  pass


def enabled(cfg, objective) -> bool:
  """Whether the run uses a reference table; raises where precompute cannot be exact."""
  if not cfg.ref.precompute:
    return False
  name = cfg.objective.name
  if objective.needs_kl:
    raise PrecomputeUnsupported(
        f"ref.precompute=True: objective {name!r} uses the full-vocabulary KL(ref || policy) at "
        "every token, which needs the reference's whole distribution in the step; only objectives "
        "that use sequence sums S_ref(y) can precompute. Unset ref.precompute")
  if objective.needs_mismatch:
    raise PrecomputeUnsupported(
        f"ref.precompute=True: objective {name!r} (KTO) also needs the reference on its mismatched "
        "rows (completion i after the prompt of the next example in the batch); batches are "
        "reshuffled every epoch, so those rows are new each time and cannot be scored once per "
        "dataset. Unset ref.precompute (the reference then runs in the step)")
  if objective.head != "lm" or not objective.needs_ref:
    print(f"ref.precompute: objective {name!r} is reference-free; no cache and no reference "
          "forward pass", flush=True)
    return False
  return True


# ------------------------------------------------------------------------------------ identities

def dataset_digest(store) -> str:
  """sha256 of what the reference scores in an encoded dataset: ids, masks, boundaries."""
  h = hashlib.sha256(f"{store.kind}:{store.per}".encode())
  for a in (store.ids, store.mask, store.offsets):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def cache_key(parts: dict) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _common_key_parts(model_cfg, ref_id):
  return {"version": FORMAT_VERSION, "model": repr(model_cfg), "ref_params": ref_id}


def train_cache_key(cfg, model_cfg, ref_id: str, store) -> str:
  """The training table's key: dataset (source, encoding settings, encoded contents), model
  config and reference fingerprint (`params_fingerprint`)."""
  return cache_key(dict(
      _common_key_parts(model_cfg, ref_id), split="train", source=cfg.data.train,
      dataset=dataset_digest(store), data={k: cfg.data[k] for k in _DATA_KEYS}))


# ----------------------------------------------------------------------------------- computation

def make_scorer(model_cfg, impl, mesh):
  """`score(ref_params, host_batch) -> [S_global] np.float32`: S_ref of every slot of the global
  batch that the processes' local batches (unstacked, unpacked or packed) form together, computed
  as the train step's reference pass computes it. Process p's slots are [p * S, (p + 1) * S)."""
  spec = forward.ForwardSpec(model_cfg=model_cfg, impl=impl)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  @jax.jit
  def sums(ref_params, batch):
    # With nothing requested but the policy's log-probs, compute_logps on the reference params
    # runs the same model and log-prob primitive as the step's reference branch.
    logps = forward.compute_logps(spec, ref_params, None, batch)
    return jax.lax.with_sharding_constraint(common.sequence_sums(logps["policy"], batch),
                                            replicated)

  def score(ref_params, batch):
    # to_device renumbers seq_index to the global slots (train.batches.global_seq_index).
    local = {k: batch[k] for k in batching.TOKEN_KEYS + ("example_valid",)}
    out = sums(ref_params, tbatches.to_device(local, mesh, batch_axis=0))
    return np.asarray(jax.device_get(out), np.float32)

  return score


def _local_part(global_S, batch):
  s = batch["example_valid"].shape[0]
  p = jax.process_index()
  return global_S[p * s:(p + 1) * s]


def compute_table(score, ref_params, store, *, max_len, batch_size) -> np.ndarray:
  """One unshuffled pass over `store` -> [len(store), store.per] float32 S_ref table.

  Every process scores its slice of each global batch of `batch_size` examples (the pipeline's
  layout) and gets the whole table (the scores are replicated), so any process can look up any
  example of its own batches.
  """
  n, per = len(store), store.per
  pc, pi = jax.process_count(), jax.process_index()
  local = batch_size // pc
  table = np.zeros((n, per), np.float32)
  for start in range(0, n, batch_size):
    ids = list(range(start, min(start + batch_size, n)))
    ids += [None] * (batch_size - len(ids))
    mine = ids[pi * local:(pi + 1) * local]
    batch = batching.unpacked_batch([None if i is None else store.example(i) for i in mine],
                                    max_len, per, mine)
    flat = score(ref_params, batch)
    # Global slot j = process j // (local * per)'s slot, i.e. sequence j % per of ids[j // per].
    for j in range(batch_size * per):
      if ids[j // per] is not None:
        table[ids[j // per], j % per] = flat[j]
  return table


def score_batches(score, ref_params, batches) -> list[np.ndarray]:
  """S_ref [S] for each of a fixed list of (process-local) batches, e.g. the eval set."""
  return [_local_part(score(ref_params, b), b) for b in batches]


def lookup(table, batch) -> dict:
  """Adds `ref_seq_logp` [S] to a host batch from its `example_id` (0 for padding slots).

  Slot s holds sequence s % per of its example: pairs sit at slots 2p, 2p + 1 (chosen, rejected)
  in unpacked and packed batches alike.
  """
  ids = batch["example_id"]
  per = table.shape[1]
  sub = np.arange(ids.shape[-1]) % per
  values = np.where(ids >= 0, table[np.maximum(ids, 0), sub], 0.0)
  return dict(batch, ref_seq_logp=values.astype(np.float32))


# ---------------------------------------------------------------------------------- disk cache

def _all_processes(flag: bool) -> bool:
  """True when `flag` holds on every process (the compute-or-load choice must be collective:
  computing runs jitted collectives that every process has to enter)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def _read(path, key, shape):
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as f:
    if str(f["key"]) != key or f["table"].shape != tuple(shape):
      raise ValueError(f"{path}: not the table for key {key} of shape {shape}")
    return np.asarray(f["table"], np.float32)


def _write(path, key, table):
  """Atomic: a run killed mid-write leaves no truncated file under the final name.

  Through etils.epath, so the workdir may be gs:// (a rename there is a copy, but objects only
  ever appear whole).
  """
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = io.BytesIO()
  np.savez(data, table=table, key=np.asarray(key))
  tmp = path.parent / f"{path.name}.tmp{jax.process_index()}.npz"
  tmp.write_bytes(data.getvalue())
  tmp.replace(path)


def load_or_compute(path, key, shape, compute, what):
  """The table at `path` when it is there (on every process) and matches; else `compute()`."""
  ok = False
  if epath.Path(path).exists():
    try:
      table = _read(path, key, shape)
      ok = True
    except (ValueError, OSError, KeyError) as e:   # a damaged or foreign file: recompute
      log.warning("ref.precompute: ignoring %s (%s)", path, e)
  if _all_processes(ok):
    print(f"ref.precompute: {what}: reusing {path}", flush=True)
    return table
  t0 = time.time()
  table = compute()
  _write(path, key, table)
  print(f"ref.precompute: {what}: scored with the reference in {time.time() - t0:.1f} s -> "
        f"{path}", flush=True)
  return table


# ---------------------------------------------------------------------------------------- set-up

def _batch_size(requested, mesh):
  """A global batch the data-parallel devices and the processes both divide."""
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  unit = int(np.lcm(dp, jax.process_count()))
  return max(unit, -(-requested // unit) * unit)


def setup(cfg, model_cfg, workdir, ref_params, train_store, eval_batches, mesh):
  """Scores the training set (and the eval batches) with the reference, through the disk cache.

  Returns (attach, eval_batches): `attach(host_batch)` adds `ref_seq_logp` to a training
  micro-batch; the eval batches come back with theirs. The caller then drops the reference params.
  """
  score = make_scorer(model_cfg, cfg.ops.impl, mesh)
  ref_id = fingerprint.params_fingerprint(ref_params)
  common_parts = _common_key_parts(model_cfg, ref_id)
  directory = os.path.join(workdir, "ref_cache")

  train_key = train_cache_key(cfg, model_cfg, ref_id, train_store)
  table = load_or_compute(
      os.path.join(directory, f"{train_key}.npz"), train_key, (len(train_store), train_store.per),
      lambda: compute_table(score, ref_params, train_store, max_len=cfg.data.max_len,
                            batch_size=_batch_size(cfg.eval.batch_size, mesh)),
      f"training set ({len(train_store)} examples, {len(train_store) * train_store.per} "
      "sequences)")

  if eval_batches:
    # The eval set is a fixed list of process-local batches: score it as batched, keyed by the
    # batches' contents (per process: each holds its own slice).
    h = hashlib.sha256()
    for b in eval_batches:
      for k in batching.TOKEN_KEYS + ("example_valid",):
        h.update(np.ascontiguousarray(b[k]).tobytes())
    eval_key = cache_key(dict(common_parts, split="eval", source=cfg.data.eval,
                              batches=h.hexdigest(), process=jax.process_index(),
                              processes=jax.process_count()))
    s = eval_batches[0]["example_valid"].shape[0]
    eval_table = load_or_compute(
        os.path.join(directory, f"{eval_key}.npz"), eval_key, (len(eval_batches), s),
        lambda: np.stack(score_batches(score, ref_params, eval_batches)),
        f"eval set ({len(eval_batches)} batches, "
        f"{int(sum(b['example_valid'].sum() for b in eval_batches))} sequences)")
    eval_batches = [dict(b, ref_seq_logp=eval_table[i]) for i, b in enumerate(eval_batches)]
  return (lambda batch: lookup(table, batch)), eval_batches
