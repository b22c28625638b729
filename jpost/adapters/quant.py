"""Weight-only quantisation of frozen kernels (QLoRA's base): int8 per output channel, NF4 blocks.

Both work on one projection kernel in jpost's layout, stacked over layers: `w [L, *in, *out]`,
`n_in` leading dims contracted with the input (1 for q/k/v/gate/up/down, 2 for o_proj's
[heads, head_dim]). The stored arrays keep the leading layer axis, so `nn.scan` hands each layer
its own slice and the layer dequantises only that slice (`dequantize_*` takes one layer).

- int8: `q [L, *in, *out] int8 = round(w / scale)`, `scale [L, *out] = absmax over the input
  dims / 127` (symmetric, per output channel). Error <= scale / 2 per element.
- nf4 (QLoRA, Dettmers et al. 2023): per output channel the n_in inputs are cut into blocks of 64
  (zero-padded at the end); each block stores its absmax (float32) and, per value, the index of
  the nearest of the 16 NormalFloat levels of w / absmax, two 4-bit indices per byte:
  `codes [L, n_blocks, 32, *out] uint8` (element 2j in the low nibble, 2j + 1 in the high one),
  `absmax [L, n_blocks, *out]`. About 4.5 bits per weight (QLoRA's double quantisation of the
  absmax values, which saves another 0.37 bit, is not implemented).

Blocks run along the input dims so the arrays keep the kernel's output axes and the block axis
can be sharded like the kernel's first input dim (see `logical_axes`).
"""
import numpy as np
import jax
import jax.numpy as jnp

KINDS = ("int8", "nf4")
NF4_BLOCK = 64
# The 16 NormalFloat4 levels (QLoRA paper, appendix E; bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Decision boundaries between neighbouring levels: index = number of midpoints below the value.
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

# Names of the stored leaves that replace `kernel` in a projection's params.
LEAVES = {"int8": ("kernel_int8", "kernel_scale"), "nf4": ("kernel_nf4", "kernel_absmax")}


def _split_dims(shape, n_in):
  """[L, *in, *out] -> (L, in dims, out dims)."""
  return shape[0], tuple(shape[1:1 + n_in]), tuple(shape[1 + n_in:])


def quantize_int8(w, n_in: int):
  """w [L, *in, *out] float -> {'kernel_int8': int8 same shape, 'kernel_scale': [L, *out] f32}."""
  w = jnp.asarray(w, jnp.float32)
  in_axes = tuple(range(1, 1 + n_in))
  scale = jnp.max(jnp.abs(w), axis=in_axes) / 127.0
  expanded = jnp.expand_dims(scale, in_axes)
  # An all-zero output channel has scale 0: its codes are 0 (and dequantise to 0).
  q = jnp.where(expanded > 0, w / jnp.where(expanded > 0, expanded, 1.0), 0.0)
  q = jnp.clip(jnp.round(q), -127, 127).astype(jnp.int8)
  return {"kernel_int8": q, "kernel_scale": scale}


def dequantize_int8(stored, shape, dtype):
  """One layer: q [*in, *out], scale [*out] -> w `shape` in `dtype` (scale broadcasts over in)."""
  w = stored["kernel_int8"].astype(jnp.float32) * stored["kernel_scale"].astype(jnp.float32)
  return w.reshape(shape).astype(dtype)


def quantize_nf4(w, n_in: int):
  """w [L, *in, *out] float -> {'kernel_nf4': [L, nb, 32, *out] uint8, 'kernel_absmax': [L, nb, *out]}."""
  w = jnp.asarray(w, jnp.float32)
  layers, ins, outs = _split_dims(w.shape, n_in)
  n = int(np.prod(ins))
  n_blocks = -(-n // NF4_BLOCK)
  flat = w.reshape((layers, n) + outs)
  flat = jnp.pad(flat, [(0, 0), (0, n_blocks * NF4_BLOCK - n)] + [(0, 0)] * len(outs))
  blocks = flat.reshape((layers, n_blocks, NF4_BLOCK) + outs)
  absmax = jnp.max(jnp.abs(blocks), axis=2)
  safe = jnp.where(absmax > 0, absmax, 1.0)[:, :, None]
  idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), (blocks / safe).reshape(-1), side="left")
  idx = idx.reshape(blocks.shape).astype(jnp.uint8)
  pairs = idx.reshape((layers, n_blocks, NF4_BLOCK // 2, 2) + outs)
  codes = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)
  return {"kernel_nf4": codes.astype(jnp.uint8), "kernel_absmax": absmax}


def dequantize_nf4(stored, shape, n_in: int, dtype):
  """One layer: codes [nb, 32, *out], absmax [nb, *out] -> w `shape` ([*in, *out]) in `dtype`."""
  codes, absmax = stored["kernel_nf4"], stored["kernel_absmax"]
  ins, outs = tuple(shape[:n_in]), tuple(shape[n_in:])
  n_blocks = codes.shape[0]
  pairs = jnp.stack([codes & 15, codes >> 4], axis=2)        # [nb, 32, 2, *out]
  idx = pairs.reshape((n_blocks, NF4_BLOCK) + outs).astype(jnp.int32)
  values = jnp.take(jnp.asarray(NF4_LEVELS), idx) * absmax.astype(jnp.float32)[:, None]
  n = int(np.prod(ins))
  return values.reshape((n_blocks * NF4_BLOCK,) + outs)[:n].reshape(shape).astype(dtype)


def quantize(kind: str, w, n_in: int) -> dict:
  if kind == "int8":
    return quantize_int8(w, n_in)
  if kind == "nf4":
    return quantize_nf4(w, n_in)
  raise ValueError(f"quantize={kind!r}: expected one of {KINDS}")


def stored_kind(leaves: dict) -> str | None:
  """Which quantised form a projection's params dict holds (None: a plain `kernel`)."""
  for kind, (codes, _) in LEAVES.items():
    if codes in leaves:
      return kind
  return None


def dequantize_layer(kind: str, stored: dict, shape, n_in: int, dtype):
  """One layer's kernel from its stored slices (no layer axis)."""
  if kind == "int8":
    return dequantize_int8(stored, shape, dtype)
  return dequantize_nf4(stored, shape, n_in, dtype)


def dequantize(kind: str, stored: dict, shape, n_in: int, dtype=jnp.float32):
  """All layers: stored leaves [L, ...] -> the kernel `shape` ([L, *in, *out]) in `dtype`."""
  return jax.vmap(lambda s: dequantize_layer(kind, s, shape[1:], n_in, dtype))(stored)


def logical_axes(kind: str, kernel_axes: tuple, n_in: int) -> dict:
  """Logical axis names of the stored leaves, from the kernel's ('layers', *in, *out).

  int8 codes keep the kernel's axes; scales its output axes. NF4's block axis takes the name of
  the kernel's first input dim (blocks are contiguous runs of it), so FSDP splits the stored
  base like the float kernel it replaces; the 32 packed pairs are never split.
  """
  layers, ins, outs = kernel_axes[0], kernel_axes[1:1 + n_in], kernel_axes[1 + n_in:]
  if kind == "int8":
    return {"kernel_int8": tuple(kernel_axes), "kernel_scale": (layers,) + tuple(outs)}
  return {"kernel_nf4": (layers, ins[0], None) + tuple(outs),
          "kernel_absmax": (layers, ins[0]) + tuple(outs)}
