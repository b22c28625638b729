"""int8 / NF4 quantisation of frozen kernels against independent NumPy references."""
import jax
import numpy as np
import pytest

from jpost import models
from jpost.adapters import lora, quant


def _np_int8(w, n_in):
  axes = tuple(range(1, 1 + n_in))
  scale = np.abs(w).max(axis=axes, keepdims=True) / 127.0
  q = np.clip(np.round(w / scale), -127, 127)
  return q.astype(np.int8), scale.astype(np.float32)


def _np_nf4_dequant(w, n_in):
  """Round each value to the nearest NF4 level of its block (64 consecutive inputs per output
  channel, zero-padded), by brute-force argmin: no midpoints, no packing."""
  layers = w.shape[0]
  n = int(np.prod(w.shape[1:1 + n_in]))
  flat = w.reshape((layers, n, -1))
  nb = -(-n // 64)
  padded = np.zeros((layers, nb * 64, flat.shape[-1]), np.float32)
  padded[:, :n] = flat
  blocks = padded.reshape(layers, nb, 64, -1)
  absmax = np.abs(blocks).max(axis=2, keepdims=True)
  scaled = blocks / np.where(absmax > 0, absmax, 1.0)
  idx = np.abs(scaled[..., None] - quant.NF4_LEVELS).argmin(-1)
  deq = quant.NF4_LEVELS[idx] * absmax
  return deq.reshape(layers, nb * 64, -1)[:, :n].reshape(w.shape), absmax


# (kernel shape [L, *in, *out], n_in): q_proj-like, and o_proj-like (two input dims) with an
# input size (4 x 25) that is not a multiple of the NF4 block (padding).
SHAPES = [((2, 128, 4, 16), 1), ((3, 4, 25, 24), 2)]
# One compile per shape instead of one per eager op.
_quantize = jax.jit(quant.quantize, static_argnums=(0, 2))
_dequantize = jax.jit(quant.dequantize, static_argnums=(0, 2, 3))


@pytest.mark.parametrize("shape,n_in", SHAPES)
def test_int8_per_channel_matches_numpy_within_half_a_step(shape, n_in):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w[0, ..., 0] = 0.0                      # an all-zero output channel: codes 0, no NaN
  stored = _quantize("int8", w, n_in)
  with np.errstate(invalid="ignore"):
    q_ref, scale_ref = _np_int8(w, n_in)
  np.testing.assert_allclose(np.asarray(stored["kernel_scale"]), scale_ref.reshape(
      stored["kernel_scale"].shape), rtol=1e-6)
  q = np.asarray(stored["kernel_int8"])
  assert q.dtype == np.int8 and q.shape == w.shape
  nonzero = np.broadcast_to(scale_ref > 0, w.shape)
  np.testing.assert_array_equal(q[nonzero], q_ref[nonzero])
  assert not q[~nonzero].any()
  deq = np.asarray(_dequantize("int8", stored, shape, n_in))
  err = np.abs(deq - w)
  assert np.all(err <= np.broadcast_to(scale_ref, w.shape) / 2 * (1 + 1e-5) + 1e-12)
  assert np.abs(deq - w).max() > 0                     # it does quantise


@pytest.mark.parametrize("shape,n_in", SHAPES)
def test_nf4_blocks_match_numpy_nearest_level(shape, n_in):
  w = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  stored = _quantize("nf4", w, n_in)
  n = int(np.prod(shape[1:1 + n_in]))
  nb = -(-n // 64)
  outs = shape[1 + n_in:]
  assert stored["kernel_nf4"].shape == (shape[0], nb, 32) + outs
  assert stored["kernel_nf4"].dtype == np.uint8
  assert stored["kernel_absmax"].shape == (shape[0], nb) + outs
  deq = np.asarray(_dequantize("nf4", stored, shape, n_in))
  deq_ref, absmax = _np_nf4_dequant(w, n_in)
  np.testing.assert_allclose(deq, deq_ref, rtol=1e-6, atol=0)
  # Error bound: half the widest gap between neighbouring levels, times the block's absmax.
  half_gap = np.diff(quant.NF4_LEVELS).max() / 2
  bound = np.repeat(absmax.reshape(shape[0], nb, -1), 64, axis=1)[:, :n].reshape(w.shape)
  assert np.all(np.abs(deq - w) <= half_gap * bound * (1 + 1e-6))
  # The block maxima are levels +-1: they come back exactly.
  flat = np.abs(w).reshape(shape[0], n, -1)
  first_block_max = flat[:, :min(n, 64)].argmax(1)
  got = np.abs(deq).reshape(shape[0], n, -1)
  np.testing.assert_allclose(np.take_along_axis(got, first_block_max[:, None], 1)[:, 0],
                             flat[:, :min(n, 64)].max(1), rtol=1e-6)


def test_nf4_packs_two_codes_per_byte_low_nibble_first():
  # One output channel whose first block is levels 0..15 then 15..0 times 2 (absmax 2).
  levels = np.concatenate([quant.NF4_LEVELS, quant.NF4_LEVELS[::-1]] * 2) * 2.0
  w = levels.reshape(1, 64, 1).astype(np.float32)
  codes = np.asarray(_quantize("nf4", w, 1)["kernel_nf4"])[0, 0, :, 0]
  idx = np.concatenate([np.arange(16), np.arange(16)[::-1]] * 2)
  np.testing.assert_array_equal(codes, idx[0::2] | (idx[1::2] << 4))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantised_base_stores_fewer_bytes(kind):
  cfg = models.get_model_config("tiny", num_layers=2, d_model=128, mlp_dim=256, num_heads=4,
                                head_dim=32)
  lm = jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))
  spec = lora.LoraSpec(rank=4, alpha=8.0, quantize=kind)
  qlm = jax.eval_shape(lambda p: lora.quantize_base(p, spec, cfg), lm)
  kernels = {name: lora.get_path(lm, lora.TARGETS[name][0])["kernel"] for name in lora.TARGETS}
  target_bytes = sum(k.size * 4 for k in kernels.values())
  expected = lora.tree_bytes(lm) - target_bytes
  for name, k in kernels.items():
    n_in = lora.TARGETS[name][1]
    n_out = int(np.prod(k.shape[1 + n_in:]))
    n = int(np.prod(k.shape[1:1 + n_in]))
    if kind == "int8":     # 1 byte per weight + a float32 scale per output channel
      expected += k.size + k.shape[0] * n_out * 4
    else:                  # 4 bits per weight + a float32 absmax per 64-value block
      expected += k.shape[0] * n_out * (n // 2 + 4 * (-(-n // 64)))
  assert lora.tree_bytes(qlm) == expected
  ratio = (lora.tree_bytes(qlm) - (lora.tree_bytes(lm) - target_bytes)) / target_bytes
  assert ratio < {"int8": 0.27, "nf4": 0.145}[kind], ratio
