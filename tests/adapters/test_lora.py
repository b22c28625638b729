"""LoRA / QLoRA forward: zero adapters change nothing, merge == adapter forward, dropout, config."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from jpost import models
from jpost.adapters import lora
from jpost.train import config as tconfig

CFG = models.get_model_config("tiny")          # float32 compute
IDS = np.random.default_rng(0).integers(1, CFG.vocab_size, (2, 12)).astype(np.int32)
SPEC = lora.LoraSpec(rank=4, alpha=8.0)
# Jitted once per spec: eager, these helpers would compile every small op separately.
_init = jax.jit(lora.init_adapters, static_argnums=(0, 1))
_attach = jax.jit(lora.attach, static_argnums=2)
_merge = jax.jit(lora.merge, static_argnums=(2, 3))
_quantize = jax.jit(lora.quantize_base, static_argnums=(1, 2))
_dequantize = jax.jit(lora.dequantized_base, static_argnums=1)


@pytest.fixture(scope="module")
def base():
  lm = random_params(CFG)
  return lm, np.asarray(models.logits(CFG, lm, IDS))


def _trained_like(adapters):
  """Adapters with B != 0 (as after training), so the adapter path matters (host draws: no
  threefry compile)."""
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda x: (np.asarray(x, np.float32) + 0.05 * rng.normal(
      size=x.shape)).astype(x.dtype), adapters)


def test_zero_initialised_adapters_leave_logits_unchanged(base):
  lm, z_base = base
  adapters = _init(SPEC, CFG, jax.random.PRNGKey(1))
  a = adapters["layers"]["attn"]["q_proj"]["a"]
  assert a.shape == (CFG.num_layers, 4, CFG.d_model) and float(jnp.abs(a).max()) > 0
  assert adapters["layers"]["attn"]["o_proj"]["a"].shape == (
      CFG.num_layers, 4, CFG.num_heads, CFG.head_dim)
  assert not any(jnp.any(ab["b"]) for ab in jax.tree.leaves(
      adapters, is_leaf=lambda x: isinstance(x, dict) and "b" in x))
  z = np.asarray(models.logits(CFG, _attach(lm, adapters, SPEC), IDS))
  np.testing.assert_array_equal(z, z_base)


def test_merged_weights_equal_the_adapter_forward(base, tmp_path):
  lm, z_base = base
  adapters = _trained_like(_init(SPEC, CFG, jax.random.PRNGKey(1)))
  z_lora = np.asarray(models.logits(CFG, _attach(lm, adapters, SPEC), IDS))
  assert np.abs(z_lora - z_base).max() > 1e-2            # the adapters do change the model
  # Through the HF export (what --adapters=merged writes) and back.
  models.save_hf(CFG, jax.device_get(_merge(lm, adapters, SPEC, CFG)), str(tmp_path))
  cfg2, merged = models.load_hf(str(tmp_path))
  z_merged = np.asarray(models.logits(dataclasses.replace(cfg2, name=CFG.name), merged, IDS))
  np.testing.assert_allclose(z_merged, z_lora, atol=1e-5, rtol=0)


def test_targets_adapt_only_the_named_modules(base):
  lm, z_base = base
  spec = lora.LoraSpec(rank=2, alpha=2.0, targets=lora.parse_targets("v_proj, down_proj"))
  adapters = _trained_like(_init(spec, CFG, jax.random.PRNGKey(1)))
  assert set(adapters["layers"]) == {"attn", "mlp"}
  assert set(adapters["layers"]["attn"]) == {"v_proj"}
  assert set(adapters["layers"]["mlp"]) == {"down_proj"}
  attached = _attach(lm, adapters, spec)
  assert "lora_a" in attached["layers"]["attn"]["v_proj"]
  assert "lora_a" not in attached["layers"]["attn"]["q_proj"]
  assert "lora_a" not in lm["layers"]["attn"]["v_proj"]          # the base is not modified
  z = np.asarray(models.logits(CFG, attached, IDS))
  z_merged = np.asarray(models.logits(CFG, _merge(lm, adapters, spec, CFG), IDS))
  np.testing.assert_allclose(z_merged, z, atol=1e-5, rtol=0)
  assert np.abs(z - z_base).max() > 1e-3


@pytest.mark.parametrize("kind", [pytest.param("int8", marks=pytest.mark.slow), "nf4"])
def test_qlora_with_zero_adapters_equals_the_dequantised_base(base, kind):
  """(int8 is slow: one more model compile; its dequantisation is checked in test_quant.py.)"""
  lm, z_base = base
  spec = dataclasses.replace(SPEC, quantize=kind, adapter_dtype="bfloat16")
  qlm = _quantize(lm, spec, CFG)
  assert "kernel" not in qlm["layers"]["mlp"]["up_proj"]
  adapters = _init(spec, CFG, jax.random.PRNGKey(1))
  assert adapters["layers"]["mlp"]["up_proj"]["a"].dtype == jnp.bfloat16
  z = np.asarray(models.logits(CFG, _attach(qlm, adapters, spec), IDS))
  z_deq = np.asarray(models.logits(CFG, _dequantize(qlm, CFG), IDS))
  np.testing.assert_allclose(z, z_deq, atol=1e-5, rtol=0)
  # Quantisation does perturb the model (bounds per weight: tests/adapters/test_quant.py).
  assert np.abs(z - z_base).max() > 1e-4


@pytest.mark.slow
def test_dropout_only_with_a_key_and_differs_per_key(base):
  """Slow: a model compile with a dropout mask per projection (~15 s of CPU on 2 cores); the
  train step with dropout runs in test_lora_train.py's slow objective tests."""
  lm, _ = base
  spec = dataclasses.replace(SPEC, dropout=0.5)
  adapters = _trained_like(_init(spec, CFG, jax.random.PRNGKey(1)))
  run = lambda rng: np.asarray(models.logits(CFG, _attach(lm, adapters, spec, rng), IDS))
  z_eval = run(None)
  np.testing.assert_array_equal(z_eval, np.asarray(models.logits(
      CFG, _attach(lm, adapters, dataclasses.replace(spec, dropout=0.0)), IDS)))
  z1, z1_again, z2 = run(jax.random.PRNGKey(7)), run(jax.random.PRNGKey(7)), run(
      jax.random.PRNGKey(8))
  np.testing.assert_array_equal(z1, z1_again)
  assert np.abs(z1 - z_eval).max() > 1e-3 and np.abs(z1 - z2).max() > 1e-3


def test_config_section_and_validation():
  section = tconfig.base_config("sigmoid").lora
  assert lora.spec_from_config(section) is None                  # rank 0 = off by default
  section.update(rank=8, alpha=16.0, quantize="nf4")
  spec = lora.spec_from_config(section)
  assert spec.targets == tuple(lora.TARGETS) and spec.scale == 2.0
  assert spec.adapter_dtype == "bfloat16"                         # QLoRA default
  section.quantize = "none"
  assert lora.spec_from_config(section, "float32").adapter_dtype == "float32"
  bad = dict(section.to_dict(), targets="q_proj,v_prj", dropout=1.5, quantize="int4")
  with pytest.raises(ValueError) as e:
    lora.spec_from_config(bad)
  for needle in ("'v_prj' (did you mean 'v_proj'?)", "dropout=1.5", "quantize='int4'"):
    assert needle in str(e.value)
  with pytest.raises(ValueError, match="need adapters: set lora.rank > 0"):
    lora.spec_from_config(dict(section.to_dict(), rank=0, quantize="int8"))
  with pytest.raises(ValueError, match="expected an integer >= 0"):
    lora.spec_from_config(dict(section.to_dict(), rank=-1))
