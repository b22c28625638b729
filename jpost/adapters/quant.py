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
  `absmax [L, n_blocks, *out]`. About 4.5 bits per weight.
- nf4 + double quantisation (QLoRA's, bitsandbytes' `bnb_4bit_use_double_quant`; stored kind
  'nf4_dq'): the same codes; the absmax values lose their per-tensor (= per layer) mean and are
  stored as 8-bit codes of bitsandbytes' signed dynamic map (`DYNAMIC_MAP`), each the nearest
  level of value / (absmax of its block of 256): `absmax_q8 [L, n_blocks, *out] uint8`,
  `absmax_scale [L, n_blocks, ceil(O / 256)] f32` (O = prod(out); the 256-blocks run along the
  flattened output dims of one block row, the last one zero-padded when 256 does not divide O),
  `absmax_mean [L] f32`. absmax ~= DYNAMIC_MAP[q8] * scale + mean. About 4.127 bits per weight
  (8 + 32 / 256 bits per 64 weights for the scales instead of 32). bitsandbytes cuts its
  256-blocks from the flat absmax of the whole tensor; both agree whenever 256 divides O (every
  real model's projections), only the padding of tiny shapes differs.

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

DQ_BLOCK = 256


def _dynamic_map():
  """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`, Dettmers 2015):
  for exponents 10^-6 .. 10^0, the midpoints of 2^i + 1 evenly spaced fractions in [0.1, 1],
  both signs, plus 0 and 1: 256 sorted levels in [-0.993, 1]."""
  data = [0.0, 1.0]
  for i in range(7):
    fractions = np.linspace(0.1, 1, 2 ** i + 1)
    means = (fractions[:-1] + fractions[1:]) / 2 * 10.0 ** (i - 6)
    data += list(means) + list(-means)
  return np.sort(np.array(data, np.float32))


DYNAMIC_MAP = _dynamic_map()
_DYNAMIC_MIDPOINTS = (DYNAMIC_MAP[1:] + DYNAMIC_MAP[:-1]) / 2

# Names of the stored leaves that replace `kernel` in a projection's params; the first is the
# weight codes. 'nf4_dq' is `lora.quantize=nf4` with `lora.double_quant`.
LEAVES = {"int8": ("kernel_int8", "kernel_scale"), "nf4": ("kernel_nf4", "kernel_absmax"),
          "nf4_dq": ("kernel_nf4", "kernel_absmax_q8", "kernel_absmax_scale",
                     "kernel_absmax_mean")}


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


def _dq_rows(x, n_out):
  """[..., nb, *out] -> [..., nb, n_256, 256]: each block row's flattened outputs, zero-padded."""
  lead = x.shape[:-n_out]
  rows = x.reshape(lead + (-1,))
  o = rows.shape[-1]
  pad = -(-o // DQ_BLOCK) * DQ_BLOCK - o
  rows = jnp.pad(rows, [(0, 0)] * len(lead) + [(0, pad)])
  return rows.reshape(lead + (-1, DQ_BLOCK))


def quantize_nf4_dq(w, n_in: int):
  """NF4 plus double quantisation of the absmax: {'kernel_nf4', 'kernel_absmax_q8' [L, nb, *out]
  uint8, 'kernel_absmax_scale' [L, nb, n_256] f32, 'kernel_absmax_mean' [L] f32}."""
  stored = quantize_nf4(w, n_in)
  absmax = stored.pop("kernel_absmax")
  layers, outs = absmax.shape[0], absmax.shape[2:]
  mean = jnp.mean(absmax.reshape(layers, -1), axis=1)
  rows = _dq_rows(absmax - mean.reshape((layers,) + (1,) * (absmax.ndim - 1)), len(outs))
  scale = jnp.max(jnp.abs(rows), axis=-1)
  safe = jnp.where(scale > 0, scale, 1.0)[..., None]
  q8 = jnp.searchsorted(jnp.asarray(_DYNAMIC_MIDPOINTS), (rows / safe).reshape(-1), side="left")
  o = int(np.prod(outs))
  q8 = q8.reshape(rows.shape[:-2] + (-1,))[..., :o].reshape(absmax.shape).astype(jnp.uint8)
  return dict(stored, kernel_absmax_q8=q8, kernel_absmax_scale=scale, kernel_absmax_mean=mean)


def dequantize_absmax(stored):
  """One layer's NF4 absmax [nb, *out] f32 from its double-quantised form."""
  q8 = stored["kernel_absmax_q8"]
  scale = stored["kernel_absmax_scale"].astype(jnp.float32)
  n_out = q8.ndim - 1
  rows = _dq_rows(q8.astype(jnp.int32), n_out)                  # [nb, n_256, 256]
  values = jnp.take(jnp.asarray(DYNAMIC_MAP), rows) * scale[..., None]
  o = int(np.prod(q8.shape[1:]))
  values = values.reshape(q8.shape[0], -1)[:, :o].reshape(q8.shape)
  return values + stored["kernel_absmax_mean"].astype(jnp.float32)


def dequantize_nf4(stored, shape, n_in: int, dtype):
  """One layer: codes [nb, 32, *out], absmax [nb, *out] (or its double-quantised form) -> w
  `shape` ([*in, *out]) in `dtype`."""
  codes = stored["kernel_nf4"]
  absmax = stored["kernel_absmax"] if "kernel_absmax" in stored else dequantize_absmax(stored)
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
  if kind == "nf4_dq":
    return quantize_nf4_dq(w, n_in)
  raise ValueError(f"quantize={kind!r}: expected one of {tuple(LEAVES)}")


def stored_kind(leaves: dict) -> str | None:
  """Which quantised form a projection's params dict holds (None: a plain `kernel`)."""
  for kind, names in LEAVES.items():
    if all(n in leaves for n in names):
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
  base like the float kernel it replaces; the 32 packed pairs are never split. Double
  quantisation's 8-bit absmax codes take the absmax's axes, their 256-block scales only the
  block axis (a few bytes per block row), the per-layer mean only 'layers'.
  """
  layers, ins, outs = kernel_axes[0], kernel_axes[1:1 + n_in], kernel_axes[1 + n_in:]
  if kind == "int8":
    return {"kernel_int8": tuple(kernel_axes), "kernel_scale": (layers,) + tuple(outs)}
  out = {"kernel_nf4": (layers, ins[0], None) + tuple(outs),
         "kernel_absmax": (layers, ins[0]) + tuple(outs)}
  if kind == "nf4_dq":
    out["kernel_absmax_q8"] = out.pop("kernel_absmax")
    out.update(kernel_absmax_scale=(layers, ins[0], None), kernel_absmax_mean=(layers,))
  return out
