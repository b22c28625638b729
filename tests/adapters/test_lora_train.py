"""LoRA / QLoRA train steps: only adapters (and heads) train, the reference is the base with the
adapters off, and a sharded step equals the single-device one."""
import dataclasses
import functools
import math

import jax
import numpy as np
import optax
import pytest

from jpost import data as jdata
from helpers import random_params
from jpost import models
from jpost.adapters import lora
from jpost.losses import registry
from jpost.models import heads
from jpost.train import batches, forward, optim, sharding
from jpost.train import step as tstep

CFG = models.get_model_config("tiny")
SPEC = lora.LoraSpec(rank=4, alpha=8.0)
# The default-run step tests use a QLoRA base (NF4) with float32 adapters: the same step as
# plain LoRA plus dequantisation, and exact enough to compare sharded with unsharded updates.
QSPEC = lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4", adapter_dtype="float32")


@functools.lru_cache(maxsize=None)
def _base():
  return random_params(CFG)


@functools.lru_cache(maxsize=None)
def _host_batch(data_kind):
  data_cfg = jdata.config.default_config()
  data_cfg.max_len = 24
  tok = jdata.make_tokenizer(data_cfg)
  it = jdata.make_train_iterator(data_cfg, data_kind, tok, batch_size=4, seed=0)
  return batches.stack([next(it)])


def _adamw(axes, lr=1e-2):
  """The loop's optimiser: AdamW with the weight-decay mask over the trainable part."""
  opt_cfg = optim.default_config()
  opt_cfg.update(lr=lr, schedule="constant")
  return optim.make_optimizer(opt_cfg, 10, mask=optim.decay_mask(tstep.trainable(axes)))


def _momentum_sgd(axes):
  """Linear in the gradients, so sharded and unsharded updates differ only by the gradients'
  rounding; Adam's g / (|g| + eps) turns rounding of near-zero gradients into O(lr) changes."""
  del axes
  return optax.sgd(1.0, momentum=0.9)


def _setup(objective_name, spec, mesh, make_optimizer=_adamw):
  """(state, jitted step, spec) built the way jpost/train/loop.py builds them."""
  objective = registry.get_objective(objective_name)
  rules = sharding.default_rules()
  params = {"lm": _base()}
  axes = {"lm": models.param_logical_axes(CFG)}
  if objective.head == "reward":
    params["reward_head"] = heads.init_scalar_head(CFG.d_model)
    axes["reward_head"] = {"w": ("embed",), "b": ()}
  with sharding.axis_rules(rules, mesh):
    params, axes, shardings = lora.add_adapters(params, axes, spec, CFG, mesh, rules,
                                                jax.random.PRNGKey(1))
    params = jax.device_put(params, shardings)
  optimizer = make_optimizer(axes)
  fspec = forward.ForwardSpec(model_cfg=CFG, needs_ref=objective.needs_ref,
                              needs_kl=objective.needs_kl, needs_mismatch=objective.needs_mismatch,
                              head=objective.head, impl="blockwise", lora=spec)
  step = jax.jit(tstep.make_train_step(fspec, objective.fn, objective.default_config(),
                                       objective.denom_unit, optimizer,
                                       optax.constant_schedule(1.0)))
  return tstep.init_state(params, optimizer, 0), step, fspec, objective


@functools.lru_cache(maxsize=None)
def _one_device_sgd_run(objective_name, spec, steps):
  """Shared by the tests that need the same single-device run (one step compile)."""
  return _run(objective_name, spec, _one_device_mesh(), steps, _momentum_sgd)


def _run(objective_name, spec, mesh, steps=2, make_optimizer=_adamw):
  rules = sharding.default_rules()
  state, step, fspec, objective = _setup(objective_name, spec, mesh, make_optimizer)
  batch = batches.to_device(_host_batch(objective.data_kind), mesh)
  initial = jax.device_get(state.params)
  metrics = []
  with sharding.axis_rules(rules, mesh):
    for _ in range(steps):
      state, m = step(state, None, batch)
      metrics.append(jax.device_get(m))
  return initial, state, metrics, fspec


def _one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def test_dpo_trains_only_the_adapters_against_the_base_as_reference():
  initial, state, metrics, _ = _one_device_sgd_run("sigmoid", QSPEC, 2)
  assert "kernel_nf4" in state.params["lm"]["layers"]["mlp"]["down_proj"]
  # Optimiser state only for the adapters: momentum here; the loop's AdamW (shapes only) has
  # its two moments for the adapters and nothing base-sized.
  n_adapters = lora.count_adapter_params(QSPEC, CFG)
  assert sum(x.size for x in jax.tree.leaves(state.params["lora"])) == n_adapters
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == n_adapters
  axes = {"lm": lora.base_axes(models.param_logical_axes(CFG), QSPEC),
          "lora": lora.adapter_axes(QSPEC, CFG)}
  adam_state = jax.eval_shape(lambda p: tstep.init_state(p, _adamw(axes), 0), state.params)
  opt_sizes = [x.size for x in jax.tree.leaves(adam_state.opt_state)]
  assert sum(s for s in opt_sizes if s > 1) == 2 * n_adapters
  assert max(opt_sizes) < CFG.d_model * CFG.mlp_dim
  # B = 0 at the start: the policy is exactly the reference (the base, adapters off).
  np.testing.assert_allclose(metrics[0]["train/loss"], math.log(2), rtol=1e-6)
  assert metrics[1]["train/loss"] < math.log(2) - 1e-3           # and it learns
  final = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, final["lm"], initial["lm"])   # base untouched
  for ab in jax.tree.leaves(final["lora"], is_leaf=lambda x: isinstance(x, dict) and "b" in x):
    assert np.abs(ab["b"]).max() > 1e-4 and np.any(ab["a"] != 0)
  # Without adapters, a missing reference is an error, not the policy silently reused.
  with pytest.raises(ValueError, match="needs the reference model"):
    forward.reference_lm({"lm": final["lm"]}, None)


@pytest.mark.slow
def test_qlora_reward_model_trains_adapters_and_head_over_a_frozen_nf4_base():
  """bfloat16 adapters and a trained head. Slow: its own step compile (~20 s of CPU)."""
  spec = dataclasses.replace(SPEC, quantize="nf4", adapter_dtype="bfloat16")
  initial, state, metrics, _ = _run("rm_bt", spec, _one_device_mesh(), steps=2)
  final = jax.device_get(state.params)
  assert "kernel_nf4" in final["lm"]["layers"]["mlp"]["down_proj"]
  jax.tree.map(np.testing.assert_array_equal, final["lm"], initial["lm"])
  assert all(x.dtype == np.dtype("bfloat16") for x in jax.tree.leaves(final["lora"]))
  # The head starts at 0, so step 1 moves only the head; step 2 moves B. A's gradient goes
  # through B, which was still 0 in both forwards: A is exactly unchanged. (A gradient leaking
  # into the frozen base would show above.)
  is_ab = lambda x: isinstance(x, dict) and "b" in x
  for new, old in zip(jax.tree.leaves(final["lora"], is_leaf=is_ab),
                      jax.tree.leaves(initial["lora"], is_leaf=is_ab)):
    np.testing.assert_array_equal(new["a"], old["a"])
    assert np.any(new["b"] != old["b"])
  assert np.any(final["reward_head"]["w"] != initial["reward_head"]["w"])
  assert np.isfinite(metrics[0]["train/loss"])


def _spec_of(x):
  return tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))


def test_sharded_lora_step_equals_one_device():
  """(data, fsdp, tensor) = (2, 2, 2): adapters sharded like their kernels; 2 steps agree."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  _, state8, m8, _ = _run("sigmoid", QSPEC, mesh, 2, _momentum_sgd)
  a = state8.params["lora"]["layers"]["attn"]["q_proj"]["a"]          # [L, r, embed]
  b = state8.params["lora"]["layers"]["attn"]["q_proj"]["b"]          # [L, heads, head_dim, r]
  assert _spec_of(a) == (None, None, "fsdp")
  assert _spec_of(b) == (None, "tensor", None, None)
  _, state1, m1, _ = _one_device_sgd_run("sigmoid", QSPEC, 2)
  for k in ("train/loss", "train/grad_norm"):
    np.testing.assert_allclose([m[k] for m in m8], [m[k] for m in m1], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
               jax.device_get(state8.params["lora"]), jax.device_get(state1.params["lora"]))


@pytest.mark.slow
@pytest.mark.parametrize("objective_name", ["nll", "sft_kl", "kto", "simpo"])
def test_lora_step_with_other_objectives(objective_name):
  """Every other objective family (SFT, full-vocabulary KL to the reference, KTO's mismatched
  reference pass, a reference-free loss) runs with adapters and leaves the base untouched.
  Slow: one step compile per objective (~5 s each on 2 cores)."""
  spec = dataclasses.replace(SPEC, dropout=0.1)
  initial, state, metrics, _ = _run(objective_name, spec, _one_device_mesh(), steps=1)
  final = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, final["lm"], initial["lm"])
  assert np.isfinite(metrics[0]["train/loss"]) and metrics[0]["train/grad_norm"] > 0


def test_quantised_base_shards_like_the_float_kernels():
  # d_model 128 = two NF4 blocks of 64 along 'embed', so fsdp = 2 can split them.
  cfg = models.get_model_config("tiny", d_model=128)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.default_rules()
  for kind, leaf, want in (("int8", "kernel_int8", (None, "fsdp", "tensor", None)),
                           ("nf4", "kernel_nf4", (None, "fsdp", None, "tensor", None))):
    spec = dataclasses.replace(SPEC, quantize=kind)
    with sharding.axis_rules(rules, mesh):
      params, _, _ = lora.add_adapters({"lm": random_params(cfg)},
                                       {"lm": models.param_logical_axes(cfg)},
                                       spec, cfg, mesh, rules, jax.random.PRNGKey(1))
    assert _spec_of(params["lm"]["layers"]["attn"]["q_proj"][leaf]) == want
  # Double quantisation: the 8-bit absmax like the absmax, its 256-block scales by block row.
  spec = dataclasses.replace(SPEC, quantize="nf4", double_quant=True)
  with sharding.axis_rules(rules, mesh):
    params, _, _ = lora.add_adapters({"lm": random_params(cfg)},
                                     {"lm": models.param_logical_axes(cfg)},
                                     spec, cfg, mesh, rules, jax.random.PRNGKey(1))
  q_proj = params["lm"]["layers"]["attn"]["q_proj"]
  assert _spec_of(q_proj["kernel_absmax_q8"]) == (None, "fsdp", "tensor", None)
  assert _spec_of(q_proj["kernel_absmax_scale"]) == (None, "fsdp", None)


def test_qlora_double_quant_step_trains_only_the_adapters():
  """QLoRA with `lora.double_quant` (8-bit absmax): the step runs, learns, and leaves the
  double-quantised base bit-identical."""
  spec = dataclasses.replace(QSPEC, double_quant=True)
  initial, state, metrics, _ = _run("sigmoid", spec, _one_device_mesh(), 2, _momentum_sgd)
  down = state.params["lm"]["layers"]["mlp"]["down_proj"]
  assert "kernel_absmax_q8" in down and "kernel_absmax" not in down
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == lora.count_adapter_params(
      spec, CFG)
  np.testing.assert_allclose(metrics[0]["train/loss"], math.log(2), rtol=1e-6)
  assert metrics[1]["train/loss"] < math.log(2) - 1e-3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params["lm"]), initial["lm"])
