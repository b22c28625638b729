"""The offline train step: exact gradient accumulation, non-finite skipping, jit == no-jit."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jpost import data as jdata
from jpost import models
from jpost.losses import registry
from jpost.train import batches, forward, optim
from jpost.train import step as tstep


@functools.lru_cache(maxsize=None)
def _setup(objective_name, data_kind):
  model_cfg = dataclasses.replace(models.get_model_config("tiny"), dtype="float32")
  lm = models.init_params(model_cfg, jax.random.PRNGKey(0))
  objective = registry.get_objective(objective_name)
  data_cfg = jdata.config.default_config()
  data_cfg.max_len = 24
  tok = jdata.make_tokenizer(data_cfg)
  it = jdata.make_train_iterator(data_cfg, data_kind, tok, batch_size=8, seed=0)
  return model_cfg, lm, objective, next(it), tok, data_cfg


def _step_fn(model_cfg, objective, lr=1e-2, sgd=False):
  opt_cfg = optim.default_config()
  opt_cfg.lr, opt_cfg.schedule, opt_cfg.clip_norm = lr, "constant", 0.0
  # SGD makes the update linear in the gradient, so the accumulation test compares exactly what
  # accumulation computes. (Adam's first step is ~lr * g / (|g| + eps): for gradients near eps it
  # turns summation-order rounding into O(lr) differences that say nothing about accumulation.)
  optimizer = optax.sgd(lr) if sgd else optim.make_optimizer(opt_cfg, 10)
  spec = forward.ForwardSpec(model_cfg=model_cfg, needs_ref=objective.needs_ref,
                             needs_mismatch=objective.needs_mismatch, impl="blockwise")
  loss_cfg = objective.default_config()
  fn = tstep.make_train_step(spec, objective.fn, loss_cfg, objective.denom_unit, optimizer,
                             optim.make_schedule(opt_cfg, 10))
  return fn, optimizer


def _split(batch, k):
  """One batch of b rows -> k stacked micro-batches of b/k rows (re-indexing examples)."""
  b = batch["tokens"].shape[0]
  s = batch["example_valid"].shape[0]
  assert s % k == 0 and b % k == 0
  micro = []
  for i in range(k):
    rows = slice(i * b // k, (i + 1) * b // k)
    ex = slice(i * s // k, (i + 1) * s // k)
    mb = {}
    for name, x in batch.items():
      mb[name] = x[ex] if x.shape[0] == s and x.ndim == 1 else x[rows]
    for name in [n for n in mb if n.endswith("seq_index")]:   # KTO: mismatch_seq_index too
      seq = mb[name]
      mb[name] = np.where(seq >= 0, seq - i * s // k, -1).astype(np.int32)
    micro.append(mb)
  return batches.stack(micro)


@pytest.mark.parametrize("objective_name,data_kind", [("nll", "sft"), ("sigmoid", "pairwise"),
                                                     ("kto", "unpaired")])
def test_grad_accumulation_equals_one_large_batch(objective_name, data_kind):
  """KTO: z is a mean over the whole batch (computed by the step before accumulating), so k
  micro-batches give the one-batch step too."""
  model_cfg, lm, objective, batch, _, _ = _setup(objective_name, data_kind)
  fn, optimizer = _step_fn(model_cfg, objective, sgd=True)
  params = {"lm": lm}
  ref = {"lm": lm} if objective.needs_ref else None
  # Perturb the policy away from the reference so DPO has a non-trivial gradient.
  if ref is not None:
    params = {"lm": jax.tree.map(lambda x: x * 1.05, lm)}
  results = []
  for k in (1, 4):
    state = tstep.init_state(params, optimizer, 0)
    new_state, metrics = jax.jit(fn)(state, ref, _split(batch, k))
    results.append((new_state, metrics))
  (s1, m1) = results[0]
  if objective.needs_mismatch:
    assert float(m1["kto/z"]) > 0      # a z that matters (0 would hide a per-micro-batch z)
  for sk, mk in results[1:]:
    if objective.needs_mismatch:
      # z is a mean of S_theta(y') - S_ref(y'), differences of float32 sums of size ~30 (ulp
      # ~2e-6): compared in those units, not relative to z (~6e-3) itself.
      np.testing.assert_allclose(mk["kto/z"], m1["kto/z"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(mk["train/loss"], m1["train/loss"], rtol=1e-5)
    np.testing.assert_allclose(mk["train/grad_norm"], m1["train/grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 sk.params, s1.params)


def test_nonfinite_batch_is_skipped_and_counted():
  model_cfg, lm, objective, batch, _, _ = _setup("nll", "sft")
  fn, optimizer = _step_fn(model_cfg, objective)
  state = tstep.init_state({"lm": lm}, optimizer, 0)
  bad = dict(batch)
  bad["loss_mask"] = batch["loss_mask"].copy()
  bad["loss_mask"][0, np.argmax(bad["loss_mask"][0])] = np.nan   # an injected NaN
  step = jax.jit(fn)
  new_state, metrics = step(state, None, _split(bad, 1))
  assert int(metrics["train/skipped_steps"]) == 1
  assert int(new_state.nonfinite_streak) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)
  # A good batch afterwards updates the params and resets the streak (the count stays).
  good_state, good_metrics = step(new_state, None, _split(batch, 1))
  assert int(good_state.nonfinite_streak) == 0
  assert int(good_metrics["train/skipped_steps"]) == 1
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(good_state.params), jax.tree.leaves(state.params))]
  assert any(changed)


@pytest.mark.slow   # op-by-op execution of a whole train step takes ~40 s on 2 cores
def test_jit_equals_no_jit():
  model_cfg, lm, objective, batch, _, _ = _setup("nll", "sft")
  fn, optimizer = _step_fn(model_cfg, objective, sgd=True)
  state = tstep.init_state({"lm": lm}, optimizer, 0)
  stacked = _split(batch, 2)
  a, ma = jax.jit(fn)(state, None, stacked)
  with jax.disable_jit():
    b, mb = fn(state, None, jax.tree.map(jnp.asarray, stacked))
  np.testing.assert_allclose(ma["train/loss"], mb["train/loss"], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               a.params, b.params)


def test_seq_index_is_renumbered_globally_for_multi_process_batches():
  from jpost.train import batches
  b = {"seq_index": np.array([[0, 0, 1, -1], [2, 2, -1, -1]]), "example_valid": np.ones(3),
       "mismatch_seq_index": np.array([[1, -1]]), "tokens": np.array([[5, 6, 7, 0]])}
  assert batches.global_seq_index(b, 0, 1) is b
  out = batches.global_seq_index(b, 2, 4)            # process 2 of 4, 3 slots each -> offset 6
  np.testing.assert_array_equal(out["seq_index"], [[6, 6, 7, -1], [8, 8, -1, -1]])
  np.testing.assert_array_equal(out["mismatch_seq_index"], [[7, -1]])
  np.testing.assert_array_equal(out["tokens"], b["tokens"])
