"""QLoRA double quantisation (`lora.double_quant`): the NF4 block absmax values stored as 8-bit
codes of bitsandbytes' dynamic map in blocks of 256 plus a per-layer mean, against an independent
NumPy implementation; bytes, reconstruction error, the forward and config validation."""
import dataclasses

import jax
import numpy as np
import pytest

from helpers import random_params
from jpost import models
from jpost.adapters import lora, quant
from jpost.train import config as tconfig

_quantize = jax.jit(quant.quantize, static_argnums=(0, 2))
_dequantize = jax.jit(quant.dequantize, static_argnums=(0, 2, 3))


def _np_dynamic_map():
  """bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`, from its
  definition: exponent e = 0..6 holds the 2^e midpoints of 2^e + 1 points evenly spaced over
  [0.1, 1], times 10^(e - 6), with both signs; then 0 and 1."""
  values = {0.0, 1.0}
  for e in range(7):
    points = [0.1 + 0.9 * k / 2 ** e for k in range(2 ** e + 1)]
    for lo, hi in zip(points[:-1], points[1:]):
      values |= {(lo + hi) / 2 * 10.0 ** (e - 6), -(lo + hi) / 2 * 10.0 ** (e - 6)}
  return np.array(sorted(values), np.float32)


def _np_nf4_dq(w, n_in):
  """Dequantised kernel, stored absmax pieces, from the spec with brute-force nearest levels:
  NF4 codes from the exact absmax of each 64-block (per output channel, along the inputs);
  the absmax minus its per-layer mean, cut per block row into runs of 256 along the flattened
  outputs (zero-padded), each divided by its largest |value| and rounded to the nearest level of
  the dynamic map; the weights come back as NF4 level * (map level * scale + mean)."""
  layers = w.shape[0]
  n = int(np.prod(w.shape[1:1 + n_in]))
  o = int(np.prod(w.shape[1 + n_in:]))
  nb, ns = -(-n // 64), -(-o // 256)
  padded = np.zeros((layers, nb * 64, o), np.float32)
  padded[:, :n] = w.reshape(layers, n, o)
  blocks = padded.reshape(layers, nb, 64, o)
  absmax = np.abs(blocks).max(axis=2)                                   # [L, nb, O]
  nf4_idx = np.abs((blocks / absmax[:, :, None])[..., None] - quant.NF4_LEVELS).argmin(-1)
  mean = absmax.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)  # one per layer
  rows = np.zeros((layers, nb, ns * 256), np.float32)
  rows[:, :, :o] = absmax - mean[:, None, None]
  rows = rows.reshape(layers, nb, ns, 256)
  scale = np.abs(rows).max(axis=-1)                                     # [L, nb, ns]
  dmap = _np_dynamic_map()
  q8 = np.abs((rows / scale[..., None])[..., None] - dmap).argmin(-1)
  absmax_dq = (dmap[q8] * scale[..., None]).reshape(layers, nb, -1)[:, :, :o] + mean[:, None, None]
  deq = quant.NF4_LEVELS[nf4_idx] * absmax_dq[:, :, None]
  w_deq = deq.reshape(layers, nb * 64, o)[:, :n].reshape(w.shape)
  return w_deq, q8.reshape(layers, nb, -1)[:, :, :o], scale, mean, absmax


# (kernel shape [L, *in, *out], n_in): q_proj-like with 1024 outputs (four 256-blocks per block
# row, as in real models), and o_proj-like with 24 outputs (one zero-padded 256-block per row)
# and 100 inputs (NF4 padding too).
SHAPES = [((2, 256, 8, 128), 1), ((3, 4, 25, 24), 2)]


def test_dynamic_map_is_bitsandbytes():
  dmap = _np_dynamic_map()
  assert dmap.shape == (256,) and np.all(np.diff(dmap) > 0)
  np.testing.assert_array_equal(quant.DYNAMIC_MAP, dmap)
  # Ends of the table (bitsandbytes' `create_dynamic_map()`): 1 is a level, -1 is not.
  assert dmap[-1] == 1.0 and dmap[0] == np.float32(-0.99296875) and np.sum(dmap == 0) == 1
  assert np.min(np.abs(dmap[dmap != 0])) == np.float32(5.5e-7)


@pytest.mark.parametrize("shape,n_in", SHAPES)
def test_double_quant_matches_numpy(shape, n_in):
  w = np.random.default_rng(4).normal(size=shape).astype(np.float32) * 0.02
  stored = _quantize("nf4_dq", w, n_in)
  assert sorted(stored) == sorted(quant.LEAVES["nf4_dq"])
  assert quant.stored_kind(stored) == "nf4_dq"
  w_ref, q8_ref, scale_ref, mean_ref, _ = _np_nf4_dq(w, n_in)
  outs = shape[1 + n_in:]
  q8 = np.asarray(stored["kernel_absmax_q8"])
  assert q8.dtype == np.uint8 and q8.shape == (shape[0], q8_ref.shape[1]) + outs
  np.testing.assert_array_equal(q8.reshape(q8_ref.shape), q8_ref)
  assert stored["kernel_absmax_scale"].dtype == np.float32
  np.testing.assert_allclose(np.asarray(stored["kernel_absmax_scale"]), scale_ref, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stored["kernel_absmax_mean"]), mean_ref, rtol=1e-6)
  # The 4-bit codes are those of plain NF4 (computed from the exact absmax).
  np.testing.assert_array_equal(np.asarray(stored["kernel_nf4"]),
                                np.asarray(_quantize("nf4", w, n_in)["kernel_nf4"]))
  deq = np.asarray(_dequantize("nf4_dq", stored, shape, n_in))
  np.testing.assert_allclose(deq, w_ref, rtol=1e-5, atol=1e-9)


def test_double_quant_error_is_close_to_plain_nf4():
  """Relative RMS / max error vs the original, measured on a q_proj-sized kernel: plain NF4
  0.09200 / 0.01141, double quant 0.09202 / 0.01142 (the absmax errors are ~0.1 % of an absmax)."""
  shape = (2, 1024, 8, 128)
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 0.02
  rms = lambda d: np.sqrt(np.mean((d - w) ** 2) / np.mean(w ** 2))
  deq = {k: np.asarray(_dequantize(k, _quantize(k, w, 1), shape, 1)) for k in ("nf4", "nf4_dq")}
  rms_nf4, rms_dq = rms(deq["nf4"]), rms(deq["nf4_dq"])
  max_nf4, max_dq = (np.abs(deq[k] - w).max() for k in ("nf4", "nf4_dq"))
  print(f"relative RMS error nf4 {rms_nf4:.5f} nf4_dq {rms_dq:.5f}; max |error| nf4 "
        f"{max_nf4:.5f} nf4_dq {max_dq:.5f}")
  assert rms_nf4 <= rms_dq <= 1.01 * rms_nf4
  assert max_dq <= 1.05 * max_nf4
  # The absmax itself: within half a step of the dynamic map at the block's scale.
  _, _, scale, _, absmax = _np_nf4_dq(w, 1)
  stored = _quantize("nf4_dq", w, 1)
  absmax_dq = np.stack([np.asarray(quant.dequantize_absmax(
      jax.tree.map(lambda x: x[i], stored))) for i in range(shape[0])])
  half_step = np.diff(quant.DYNAMIC_MAP).max() / 2
  bound = np.repeat(scale, 256, axis=-1).reshape(absmax_dq.shape) * half_step
  assert np.all(np.abs(absmax_dq - absmax.reshape(absmax_dq.shape)) <= bound * (1 + 1e-5) + 1e-9)


def _stored_bits(shape, kind):
  stored = jax.eval_shape(lambda w: quant.quantize(kind, w, 1),
                          jax.ShapeDtypeStruct(shape, np.float32))
  return lora.tree_bytes(stored) * 8 / np.prod(shape)


def test_double_quant_stores_the_expected_bytes():
  # A real projection (Qwen3-0.6B's q_proj: 1024 -> 16 x 128 per layer): 8-bit absmax plus a
  # float32 per 256 of them instead of a float32 absmax per 64 weights, plus one mean per layer.
  shape = (28, 1024, 16, 128)
  per_layer = 1024 * 2048
  assert _stored_bits(shape, "nf4") == 4 + 32 / 64
  expected = 4 + (8 + 32 / 256) / 64 + 32 / per_layer
  np.testing.assert_allclose(_stored_bits(shape, "nf4_dq"), expected, rtol=1e-12)
  assert abs(_stored_bits(shape, "nf4_dq") - 4.127) < 1e-3
  # The whole tiny model's base: exactly the absmax bytes saved, target by target.
  cfg = models.get_model_config("tiny", num_layers=2, d_model=128, mlp_dim=256, num_heads=4,
                                head_dim=32)
  lm = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  spec = lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4")
  nbytes = {dq: lora.tree_bytes(jax.eval_shape(lambda p: lora.quantize_base(
      p, dataclasses.replace(spec, double_quant=dq), cfg), lm)) for dq in (False, True)}
  saved = 0
  for name, (path, n_in, _) in lora.TARGETS.items():
    k = lora.get_path(lm, path)["kernel"]
    n, o = int(np.prod(k.shape[1:1 + n_in])), int(np.prod(k.shape[1 + n_in:]))
    nb = -(-n // 64)
    # float32 absmax -> uint8 codes + float32 per (zero-padded) 256-run of a block row + mean
    saved += k.shape[0] * (nb * o * 4 - (nb * o + nb * -(-o // 256) * 4 + 4))
  assert nbytes[False] - nbytes[True] == saved > 0


def test_double_quant_shards_like_the_absmax():
  axes = quant.logical_axes("nf4_dq", ("layers", "embed", "heads", "kv"), 1)
  assert axes == {"kernel_nf4": ("layers", "embed", None, "heads", "kv"),
                  "kernel_absmax_q8": ("layers", "embed", "heads", "kv"),
                  "kernel_absmax_scale": ("layers", "embed", None),
                  "kernel_absmax_mean": ("layers",)}
  spec = lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4", double_quant=True)
  cfg = models.get_model_config("tiny")
  base_axes = lora.base_axes(models.param_logical_axes(cfg), spec)
  lm = jax.eval_shape(lambda: lora.quantize_base(models.init_params(
      cfg, jax.random.PRNGKey(0)), spec, cfg))
  # Every stored leaf has an axis name per dim.
  jax.tree.map(lambda x, a: None if len(a) == x.ndim else pytest.fail(f"{a} vs {x.shape}"),
               lm, base_axes, is_leaf=lambda x: isinstance(x, tuple))


def test_qlora_double_quant_forward_equals_its_dequantised_base():
  """The scanned layers dequantise their own slices (hook.quantized_kernel) exactly like the
  whole-base dequantisation that `merge` and export use, adapters included."""
  cfg = models.get_model_config("tiny")
  ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)).astype(np.int32)
  spec = lora.LoraSpec(rank=4, alpha=8.0, quantize="nf4", double_quant=True,
                       adapter_dtype="float32")
  lm = random_params(cfg)
  qlm = jax.jit(lora.quantize_base, static_argnums=(1, 2))(lm, spec, cfg)
  assert "kernel_absmax_q8" in qlm["layers"]["mlp"]["up_proj"]
  assert "kernel_absmax" not in qlm["layers"]["mlp"]["up_proj"]
  rng = np.random.default_rng(3)
  adapters = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.normal(size=x.shape).astype(
      np.float32), jax.jit(lora.init_adapters, static_argnums=(0, 1))(spec, cfg,
                                                                      jax.random.PRNGKey(1)))
  attach = jax.jit(lora.attach, static_argnums=2)
  z = np.asarray(models.logits(cfg, attach(qlm, adapters, spec), ids))
  float_spec = dataclasses.replace(spec, quantize="none", double_quant=False)
  deq = jax.jit(lora.dequantized_base, static_argnums=1)(qlm, cfg)
  z_deq = np.asarray(models.logits(cfg, attach(deq, adapters, float_spec), ids))
  np.testing.assert_allclose(z, z_deq, atol=1e-5, rtol=0)
  assert np.abs(z - np.asarray(models.logits(cfg, lm, ids))).max() > 1e-3


def test_double_quant_config_validation():
  section = tconfig.base_config("sigmoid").lora
  assert section.double_quant is False
  section.update(rank=8, quantize="nf4", double_quant=True)
  spec = lora.spec_from_config(section)
  assert spec.double_quant and spec.stored_kind == "nf4_dq"
  section.double_quant = False
  assert lora.spec_from_config(section).stored_kind == "nf4"
  # A config.json written before the switch existed reads as double_quant=False.
  old = {k: v for k, v in section.to_dict().items() if k != "double_quant"}
  assert lora.spec_from_config(old).double_quant is False
  for quantize in ("none", "int8"):
    with pytest.raises(ValueError, match=r"lora.double_quant=True .* needs "
                                         rf"lora.quantize='nf4' \(got '{quantize}'\)"):
      lora.spec_from_config(dict(section.to_dict(), quantize=quantize, double_quant=True))
  with pytest.raises(ValueError, match=r"lora.double_quant='yes': expected True or False"):
    lora.spec_from_config(dict(section.to_dict(), double_quant="yes"))
  with pytest.raises(ValueError, match=r"lora.double_quant=True need adapters"):
    lora.spec_from_config(dict(section.to_dict(), rank=0, quantize="none", double_quant=True))
  with pytest.raises(ValueError, match="needs lora.quantize='nf4'"):
    lora.LoraSpec(rank=4, alpha=8.0, quantize="int8", double_quant=True)
