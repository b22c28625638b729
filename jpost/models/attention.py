"""Rotary embeddings, attention masks and the attention kernel call, kept apart from the layers.

The functions take explicit query / key index arrays instead of assuming one square [T, T] block,
so a KV-cache decode step (queries at the end of a longer key buffer) can reuse them unchanged.

Einsum legend: B batch, T query tokens, S key tokens, H query heads, G kv heads, R = H / G query
heads per kv head, K head_dim.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

# Large negative instead of -inf: a row whose keys are all masked stays finite (it cannot happen
# for real tokens, which always see themselves, but padded rows should not produce NaNs).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def rope_inv_freq(cfg) -> np.ndarray:
  """[head_dim / 2] inverse frequencies, computed in float32 step by step as transformers does."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2).astype(np.float32) / dim))
  inv_freq = inv_freq.astype(np.float32)
  if cfg.rope_type == "default":
    return inv_freq
  # 'llama3': wavelengths longer than original_max_len / low_freq_factor are slowed down by
  # `factor`, shorter than original_max_len / high_freq_factor are kept, the band in between is
  # interpolated smoothly (transformers' _compute_llama3_parameters).
  factor = np.float32(cfg.rope_factor)
  low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_len
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = (2 * math.pi / inv_freq).astype(np.float32)
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
  smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
  smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(cfg, positions_BT):
  """cos, sin [B, T, head_dim / 2] in float32 (angles in float32, as in transformers)."""
  inv_freq = jnp.asarray(rope_inv_freq(cfg))
  angles_BTk = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles_BTk), jnp.sin(angles_BTk)


def apply_rope(x_BTHK, cos_BTk, sin_BTk):
  """Rotates the two halves of head_dim (the 'rotate_half' layout of HF checkpoints)."""
  # cos/sin are cast to the compute dtype first, like transformers, so bf16 runs match it too.
  cos = cos_BTk[:, :, None, :].astype(x_BTHK.dtype)
  sin = sin_BTk[:, :, None, :].astype(x_BTHK.dtype)
  x1, x2 = jnp.split(x_BTHK, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def make_mask(q_segment_BT, kv_segment_BS, q_index_BT, kv_index_BS, *, sliding_window=None,
              is_sliding=None):
  """[B, 1, T, S] bool: True where query t may attend to key s.

  Causal over token indices (not positions: packed positions restart per segment), restricted to
  the query's own segment (segment 0 = padding attends only to padding, so no row is empty), and,
  when `is_sliding` (a traced scalar: layers alternate under one scanned body) to keys less than
  `sliding_window` tokens back.
  """
  q_idx = q_index_BT[:, :, None]
  kv_idx = kv_index_BS[:, None, :]
  mask = (q_segment_BT[:, :, None] == kv_segment_BS[:, None, :]) & (kv_idx <= q_idx)
  if sliding_window is not None:
    in_window = q_idx - kv_idx < sliding_window
    if is_sliding is not None:
      in_window = in_window | ~is_sliding
    mask = mask & in_window
  return mask[:, None]


def attend(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, *, scale, softcap=None, impl="auto"):
  """Multi-head attention with grouped kv heads -> [B, T, H, K] in the dtype of q.

  `jax.nn.dot_product_attention` (XLA fused, cuDNN-capable) when it fits; it cannot apply a
  soft-cap to the scores, so Gemma 2 (and impl='xla') take the explicit path below.
  """
  if softcap is None and impl == "auto":
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_B1TS, scale=scale)
  return _attend_xla(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, scale=scale, softcap=softcap)


def _attend_xla(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, *, scale, softcap):
  b, t, h, k = q_BTHK.shape
  g = k_BSGK.shape[2]
  # Group the query heads by the kv head they share instead of repeating k/v (GQA / MQA).
  q_BTGRK = q_BTHK.reshape(b, t, g, h // g, k)
  scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    # Gemma 2 caps the scaled scores before masking (transformers' eager path does the same).
    scores_BGRTS = jnp.tanh(scores_BGRTS / softcap) * softcap
  scores_BGRTS = jnp.where(mask_B1TS[:, :, None], scores_BGRTS, _MASK_VALUE)
  probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(b, t, h, k)
