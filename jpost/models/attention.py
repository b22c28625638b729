"""Rotary embeddings, attention masks and the attention kernel call, kept apart from the layers.

The functions take explicit query / key index arrays instead of assuming one square [T, T] block,
so a KV-cache decode step (queries at the end of a longer key buffer) can reuse them unchanged.

Einsum legend: B batch, T query tokens, S key tokens, H query heads, G kv heads, R = H / G query
heads per kv head, K head_dim.
"""
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jpost.models.config import ATTENTION_IMPLS

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


def auto_impl(*, backend, dtype, softcap, sliding_window, head_dim, seq_len,
              compute_capability=None):
  """The fused kernel 'auto' runs full-sequence attention with, or None for XLA's attention.

  GPU: cuDNN flash attention where it applies (bf16 / fp16 compute, no soft-cap, head_dim a
  multiple of 8 up to 128, or 256 from Hopper (compute capability 9.0) on, and an even length,
  which cuDNN needs with a mask). TPU: splash, unless the model has sliding windows (not wired).
  Elsewhere, or when a condition fails, XLA's attention, which materialises the [T, S] scores
  of every head (at T = 2048 that is most of a 1B model's training memory).
  """
  if backend == "gpu":
    head_max = 256 if compute_capability and float(compute_capability) >= 9.0 else 128
    if (softcap is None and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0 and head_dim <= head_max and seq_len % 2 == 0):
      return "cudnn"
  elif backend == "tpu" and sliding_window is None:
    return "splash"
  return None


@functools.lru_cache(maxsize=None)
def _log_auto_choice(choice, reason):
  logging.getLogger(__name__).info("attention 'auto' -> %s (%s)", choice, reason)


def _resolve_auto(q_BTHK, softcap, sliding_window):
  backend = jax.default_backend()
  capability = getattr(jax.devices()[0], "compute_capability", None) if backend == "gpu" else None
  choice = auto_impl(backend=backend, dtype=q_BTHK.dtype, softcap=softcap,
                     sliding_window=sliding_window, head_dim=q_BTHK.shape[-1],
                     seq_len=q_BTHK.shape[1], compute_capability=capability)
  _log_auto_choice(choice or "xla", f"{backend}, {jnp.dtype(q_BTHK.dtype).name}, head_dim "
                   f"{q_BTHK.shape[-1]}, softcap {softcap}, window {sliding_window}")
  return choice


def attend(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, *, scale, softcap=None, impl="auto",
           segment_ids=None, sliding_window=None):
  """Multi-head attention with grouped kv heads -> [B, T, H, K] in the dtype of q.

  impl:
    'auto'    full-sequence attention takes the backend's fused kernel where it applies
              (`auto_impl`: 'cudnn' on GPU, 'splash' on TPU; the choice is logged once), else
              `jax.nn.dot_product_attention` without naming an implementation (XLA's attention
              in jax 0.10, which does not pick cuDNN by itself), or the explicit path when the
              scores are soft-capped (Gemma 2). `sliding_window` (the model's) only informs
              this choice: the window itself is in the mask.
    'xla'     the explicit path below (float32 scores, GQA without repeating k / v).
    'cudnn'   `jax.nn.dot_product_attention(implementation='cudnn')`: cuDNN's fused flash
              attention (GPU only, bf16 / fp16, no soft-cap). The mask goes in as is (jax turns
              it into an additive bias) plus `is_causal`, so cuDNN can skip masked-out blocks.
    'splash'  the Pallas splash-attention kernel (TPU only; `splash_attention`): causal by
              index with `segment_ids` (q, kv) [B, T] instead of the mask array.

  The kernels ('cudnn', 'splash') cover full-sequence attention (T == S: training, prefill),
  where they assume what `make_mask` builds there: causal by token index within segments.
  KV-cache decode steps (T != S, one query per row) always take the explicit path: a
  flash kernel has nothing to tile over a single query. Asking for a kernel the backend lacks
  is an error, never a silent fallback.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl={impl!r}: expected one of {ATTENTION_IMPLS}")
  full_sequence = q_BTHK.shape[1] == k_BSGK.shape[1]
  if impl == "auto" and full_sequence:
    impl = _resolve_auto(q_BTHK, softcap, sliding_window) or "auto"
  if impl == "cudnn":
    _check_cudnn(q_BTHK.dtype, softcap)
    if full_sequence:
      return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_B1TS, scale=scale,
                                          is_causal=True, implementation="cudnn")
  elif impl == "splash":
    _require_backend("splash", "tpu")
    if full_sequence:
      if segment_ids is None:
        raise ValueError("attention impl='splash' needs segment_ids=(q_segment_BT, "
                         "kv_segment_BS): the kernel takes segments, not a dense mask")
      return splash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids[0], scale=scale,
                              softcap=softcap)
  elif softcap is None and impl == "auto":
    return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask_B1TS, scale=scale)
  return _attend_xla(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, scale=scale, softcap=softcap)


def _require_backend(impl, platform):
  backend = jax.default_backend()
  if backend != platform:
    raise ValueError(f"attention impl={impl!r} needs a {platform.upper()} backend, but jax runs "
                     f"on {backend!r}: use 'auto' or 'xla' here")


def _check_cudnn(dtype, softcap):
  _require_backend("cudnn", "gpu")
  if softcap is not None:
    raise ValueError(f"attention impl='cudnn' cannot soft-cap scores (softcap={softcap}): use "
                     "'xla'")
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention impl='cudnn' needs bfloat16 or float16 compute (model.dtype), "
                     f"got {jnp.dtype(dtype).name}")


# Splash kernels work in blocks of at most this many tokens; sequences are padded to a multiple
# of 128 (the TPU lane width), with a segment id no real token has.
_SPLASH_BLOCK = 512
_SPLASH_PAD_SEGMENT = -1


def splash_attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT, *, scale, softcap=None,
                     interpret=False):
  """Causal self-attention within segments through the Pallas splash kernel -> [B, T, H, K].

  Tokens attend to earlier tokens of the same segment (padding, segment 0, to padding), which
  is `make_mask` for T == S. Under a mesh (`jax.set_mesh`) with more than one device, the kernel
  runs per shard in `shard_map`: rows split over ('data', 'fsdp') and heads over 'tensor' when
  it divides both H and G. `interpret=True` runs the kernel in the Pallas interpreter (any
  backend: tests).
  """
  b, t, h, k = q_BTHK.shape
  g = k_BTGK.shape[2]
  padded = -(-t // 128) * 128
  if padded != t:
    pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
    q_BTHK, k_BTGK, v_BTGK = (jnp.pad(x, pad) for x in (q_BTHK, k_BTGK, v_BTGK))
    segment_ids_BT = jnp.pad(segment_ids_BT, ((0, 0), (0, padded - t)),
                             constant_values=_SPLASH_PAD_SEGMENT)
  # The kernel does not scale; it takes heads first: q [H, T, K], k / v [G, T, K] per row.
  q_BHTK = jnp.swapaxes(q_BTHK * jnp.asarray(scale, q_BTHK.dtype), 1, 2)
  k_BGTK, v_BGTK = jnp.swapaxes(k_BTGK, 1, 2), jnp.swapaxes(v_BTGK, 1, 2)
  mesh = jax.sharding.get_abstract_mesh()
  tensor = mesh.shape.get("tensor", 1) if not mesh.empty else 1
  heads_axis = "tensor" if tensor > 1 and h % tensor == 0 and g % tensor == 0 else None
  kernel = functools.partial(_splash_rows, softcap=softcap, interpret=interpret)
  if not mesh.empty and mesh.size > 1:
    rows = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1) or None
    if rows is not None and b % int(np.prod([mesh.shape[a] for a in rows])):
      rows = None
    heads = P(rows, heads_axis, None, None)
    kernel = jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, P(rows, None)),
                           out_specs=heads, check_vma=False)
  o_BHTK = kernel(q_BHTK, k_BGTK, v_BGTK, segment_ids_BT)
  return jnp.swapaxes(o_BHTK, 1, 2)[:, :t]


def _splash_rows(q_BHTK, k_BGTK, v_BGTK, segment_ids_BT, *, softcap, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  h, t = q_BHTK.shape[1], q_BHTK.shape[2]
  block = math.gcd(t, _SPLASH_BLOCK)
  blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                         block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                         block_q_dq=block, block_kv_dq=block)
  mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * h)
  kernel = sk.make_splash_mha(mask, block_sizes=blocks, attn_logits_soft_cap=softcap,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  one_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=sk.SegmentIds(q=seg, kv=seg))
  return jax.vmap(one_row)(q_BHTK, k_BGTK, v_BGTK, segment_ids_BT)


def attend_cached(q_BTHK, k_cache_BSGK, v_cache_BSGK, cache_mask_B1TS, k_BTGK, v_BTGK,
                  new_mask_B1TT, *, scale, softcap=None):
  """T new queries over a KV cache plus the T new keys themselves -> [B, T, H, K] (decode).

  The same attention as writing the new keys into the cache and attending over it, without that
  write: updating a layer's cache slice before attending copies the whole slice, every layer and
  every decode step, where reading it once is all attention needs (the loop writes the new keys
  into the stacked cache afterwards, in place). The two score blocks share one softmax. Explicit
  XLA path (float32 scores, GQA without repeating k / v), soft-cap as in `_attend_xla`.
  """
  b, t, h, k = q_BTHK.shape
  q_BTGRK = _group_heads(q_BTHK, k_cache_BSGK.shape[2])
  s = k_cache_BSGK.shape[1]
  scores = lambda keys, mask: _masked_scores(q_BTGRK, keys, mask, scale=scale, softcap=softcap)
  probs = jax.nn.softmax(jnp.concatenate([scores(k_cache_BSGK, cache_mask_B1TS),
                                          scores(k_BTGK, new_mask_B1TT)], axis=-1), axis=-1)
  dtype = v_cache_BSGK.dtype
  out_BTGRK = (jnp.einsum("bgrts,bsgk->btgrk", probs[..., :s].astype(dtype), v_cache_BSGK,
                          preferred_element_type=jnp.float32)
               + jnp.einsum("bgrts,bsgk->btgrk", probs[..., s:].astype(dtype),
                            v_BTGK.astype(dtype), preferred_element_type=jnp.float32))
  return out_BTGRK.reshape(b, t, h, k).astype(q_BTHK.dtype)


def _group_heads(q_BTHK, g):
  """[B, T, G, R, K]: query heads grouped by the kv head they share (GQA / MQA), so k / v are
  never repeated."""
  b, t, h, k = q_BTHK.shape
  return q_BTHK.reshape(b, t, g, h // g, k)


def _masked_scores(q_BTGRK, k_BSGK, mask_B1TS, *, scale, softcap):
  """float32 scores [B, G, R, T, S], soft-capped, masked positions at _MASK_VALUE."""
  scores_BGRTS = jnp.einsum("btgrk,bsgk->bgrts", q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    # Gemma 2 caps the scaled scores before masking (transformers' eager path does the same).
    scores_BGRTS = jnp.tanh(scores_BGRTS / softcap) * softcap
  return jnp.where(mask_B1TS[:, :, None], scores_BGRTS, _MASK_VALUE)


def _attend_xla(q_BTHK, k_BSGK, v_BSGK, mask_B1TS, *, scale, softcap):
  b, t, h, k = q_BTHK.shape
  scores_BGRTS = _masked_scores(_group_heads(q_BTHK, k_BSGK.shape[2]), k_BSGK, mask_B1TS,
                                scale=scale, softcap=softcap)
  probs_BGRTS = jax.nn.softmax(scores_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(b, t, h, k)
