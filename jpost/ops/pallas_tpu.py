"""Mosaic (TPU) kernels for token_logprobs / token_kl.

Forward: grid (token tiles, vocabulary tiles, hidden chunks); the hidden axis accumulates a
[bn, bv] float32 logit tile in VMEM when `hidden` < D, then the tile is folded into per-token
online statistics held in VMEM scratch ([bn, 1] columns) and written once per token tile.
Backward: two kernels that recompute logit tiles (the FlashAttention trade: 2 extra matmuls
instead of storing [N, V]): dh with grid (token, vocab) and a [bn, D] float32 VMEM accumulator,
dw with grid (vocab, token) and a [D, bv] float32 accumulator. The innermost grid axis is the
reduction ("arbitrary"); the outer one is "parallel" (megacore split).

Blocks: (bn, *) and (*, bv) obey the (8, 128) rule (or equal the full dimension). Ragged N and V
need no padded copies: the grid is cdiv-sized, the last blocks read past the end (undefined data;
NaN in interpret mode) and their writes are dropped. What must not leak: garbage logit columns
(masked to -inf / zero cotangent by tile_math), garbage w columns in dz @ w^T and garbage h rows
or per-token values in h^T @ dz (zeroed below, on the last tile only).
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jpost.ops import tile_math as tm

DEFAULT_TOKEN_BLOCK = 256
DEFAULT_VOCAB_BLOCK = 512
_TN = (((1,), (1,)), ((), ()))
_NT = (((0,), (0,)), ((), ()))
_VMEM_CAP = 64 * 2**20   # physical VMEM per core is 64 MiB on v7x, 128 MiB on v5e/v5p/v6e


def _fit(requested, size, align):
  if size <= requested:
    return size          # one block equal to the full dimension is always legal
  if requested % align:
    raise ValueError(f"pallas_tpu block {requested} must be a multiple of {align}")
  return requested


def _blocks(spec, n, d, v):
  bn = _fit(spec.blocks.token or DEFAULT_TOKEN_BLOCK, n, 8)
  bv = _fit(spec.blocks.vocab or DEFAULT_VOCAB_BLOCK, v, 128)
  bd = spec.blocks.hidden or d
  if d % bd or (bd != d and bd % 128):
    raise ValueError(f"pallas_tpu hidden block {bd} must divide D={d} and be a multiple of 128")
  return bn, bv, bd


def _params(semantics, vmem_bytes):
  # Raise the scoped-VMEM limit (16/32 MiB defaults) to what the blocks need, double-buffered.
  limit = int(min(_VMEM_CAP, max(32 * 2**20, 1.5 * vmem_bytes)))
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=limit)


def _col(x):
  return x.reshape(x.shape[0], 1)


def _logits(h, w, bd):
  """h @ w as the forward grid computes it: hidden chunks of bd summed in order. The backward
  kernels use this too so that they recompute bit-identical logits; a differently rounded z
  against the forward's lse leaves softmax unnormalised by ~1 ulp of |lse| and, where p ~ q,
  that error does not cancel in dz (measured: 3x larger KL gradient error)."""
  d = h.shape[1]
  acc = None
  for k in range(0, d, bd):
    part = jnp.dot(h[:, k:k + bd], w[k:k + bd, :], preferred_element_type=jnp.float32)
    acc = part if acc is None else acc + part
  return acc


def _last_tile_where(is_last, keep, x):
  """where(keep, x, 0) on the ragged last tile only: a select over a [D, b] operand on every
  grid step would cost VPU time next to the matmul."""
  return lax.cond(is_last, lambda t: jnp.where(keep, t, jnp.zeros_like(t)), lambda t: t, x)


# ------------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, n_models, n_out, stat_names, init, update, finish, nv, nd, bv):
  hs, ws = refs[:n_models], refs[n_models:2 * n_models]
  lab_ref = refs[2 * n_models]
  outs = refs[2 * n_models + 1:2 * n_models + 1 + n_out]
  scratch = refs[2 * n_models + 1 + n_out:]
  stats_refs = dict(zip(stat_names, scratch))
  accs = scratch[len(stat_names):]
  j, k = pl.program_id(1), pl.program_id(2)
  bn = lab_ref.shape[0]

  @pl.when((j == 0) & (k == 0))
  def _init():
    for name, value in init((bn, 1)).items():
      stats_refs[name][...] = value

  parts = [jnp.dot(h[...], w[...], preferred_element_type=jnp.float32) for h, w in zip(hs, ws)]

  def fold(tiles):
    col = j * bv + lax.broadcasted_iota(jnp.int32, tiles[0].shape, 1)
    stats = {name: r[...] for name, r in stats_refs.items()}
    stats = update(stats, tiles, col, lab_ref[...])
    for name, value in stats.items():
      stats_refs[name][...] = value

    @pl.when(j == nv - 1)
    def _write():
      for ref, value in zip(outs, finish(stats)):
        ref[...] = value

  if nd == 1:
    fold(parts)
    return

  @pl.when(k == 0)
  def _first():
    for acc, p in zip(accs, parts):
      acc[...] = p

  @pl.when(k > 0)
  def _rest():
    for acc, p in zip(accs, parts):
      acc[...] += p

  @pl.when(k == nd - 1)
  def _fold():
    fold([acc[...] for acc in accs])


def _forward(hs, ws, labels, spec, stats, n_out, interpret):
  """stats = (names, init, update, finish); returns n_out per-token [N] float32 vectors."""
  stat_names, init, update, finish = stats
  (n, d), v = hs[0].shape, ws[0].shape[1]
  bn, bv, bd = _blocks(spec, n, d, v)
  nt, nv, nd = pl.cdiv(n, bn), pl.cdiv(v, bv), d // bd
  m = len(hs)
  col_spec = pl.BlockSpec((bn, 1), lambda i, j, k: (i, 0))
  in_specs = ([pl.BlockSpec((bn, bd), lambda i, j, k: (i, k))] * m
              + [pl.BlockSpec((bd, bv), lambda i, j, k: (k, j))] * m + [col_spec])
  scratch = [pltpu.VMEM((bn, 1), jnp.float32) for _ in stat_names]
  if nd > 1:
    scratch += [pltpu.VMEM((bn, bv), jnp.float32) for _ in range(m)]
  isz = hs[0].dtype.itemsize
  vmem = 2 * m * (bn + bv) * bd * isz + (m + 4) * bn * bv * 4
  kernel = functools.partial(_fwd_kernel, n_models=m, n_out=n_out, stat_names=stat_names,
                             init=init, update=update, finish=finish, nv=nv, nd=nd, bv=bv)
  outs = pl.pallas_call(
      kernel, grid=(nt, nv, nd), in_specs=in_specs,
      out_specs=[col_spec] * n_out,
      out_shape=[jax.ShapeDtypeStruct((n, 1), jnp.float32)] * n_out,
      scratch_shapes=scratch,
      compiler_params=_params(("parallel", "arbitrary", "arbitrary"), vmem),
      interpret=interpret, name="jpost_logprobs_fwd",
  )(*hs, *ws, _col(labels))
  return [o[:, 0] for o in outs]


# ------------------------------------------------------------------------------------ backward

def _bwd_kernel(*refs, n_models, tok_names, dlogits, wrt, n, vocab, bn, bv, bd, n_red):
  hs, ws = refs[:n_models], refs[n_models:2 * n_models]
  tok_refs = refs[2 * n_models:2 * n_models + len(tok_names)]
  out_ref, acc_ref = refs[2 * n_models + len(tok_names):]
  # wrt == "h": grid (token i, vocab j); wrt == "w": grid (vocab j, token i).
  i, j = (pl.program_id(0), pl.program_id(1)) if wrt == "h" else (pl.program_id(1),
                                                                    pl.program_id(0))
  red = pl.program_id(1)

  @pl.when(red == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  h_tiles = [h[...] for h in hs]
  w_tiles = [w[...] for w in ws]
  tiles = [_logits(a, b, bd) for a, b in zip(h_tiles, w_tiles)]
  col = j * bv + lax.broadcasted_iota(jnp.int32, tiles[0].shape, 1)
  tok = {name: r[...] for name, r in zip(tok_names, tok_refs)}
  da = dlogits(tiles, col, col < vocab, tok)
  if wrt == "h":
    w0 = w_tiles[0]
    if vocab % bv:   # garbage w columns past V: 0 * NaN would poison dz @ w^T
      w_col = j * bv + lax.broadcasted_iota(jnp.int32, w0.shape, 1)
      w0 = _last_tile_where(j == n_red - 1, w_col < vocab, w0)
    acc_ref[...] += lax.dot_general(da.astype(w0.dtype), w0, _TN,
                                    preferred_element_type=jnp.float32)
  else:
    h0 = h_tiles[0]
    if n % bn:       # garbage rows past N (h and per-token values) must not reach h^T @ dz
      row = i * bn + lax.broadcasted_iota(jnp.int32, da.shape, 0)
      da = jnp.where(row < n, da, 0.0)
      h_row = i * bn + lax.broadcasted_iota(jnp.int32, h0.shape, 0)
      h0 = _last_tile_where(i == n_red - 1, h_row < n, h0)
    acc_ref[...] += lax.dot_general(h0, da.astype(h0.dtype), _NT,
                                    preferred_element_type=jnp.float32)

  @pl.when(red == n_red - 1)
  def _write():
    out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _backward(hs, ws, tok, spec, dlogits, interpret):
  (n, d), v, dtype = hs[0].shape, ws[0].shape[1], hs[0].dtype
  bn, bv, bd = _blocks(spec, n, d, v)
  nt, nv, m = pl.cdiv(n, bn), pl.cdiv(v, bv), len(hs)
  names = tuple(tok)
  cols = [_col(tok[k]) for k in names]
  isz = dtype.itemsize
  vmem = 2 * m * (bn + bv) * d * isz + 2 * max(bn, bv) * d * isz + max(bn, bv) * d * 4
  vmem += (m + 6) * bn * bv * 4
  grads = []
  for wrt in ("h", "w"):
    if wrt == "h":
      ij = lambda a, b: (a, b)  # noqa: E731  grid (token, vocab)
      grid, out_block, out_shape = (nt, nv), (bn, d), (n, d)
      out_map = lambda a, b: (a, 0)  # noqa: E731
    else:
      ij = lambda a, b: (b, a)  # noqa: E731  grid (vocab, token)
      grid, out_block, out_shape = (nv, nt), (d, bv), (d, v)
      out_map = lambda a, b: (0, a)  # noqa: E731
    in_specs = ([pl.BlockSpec((bn, d), lambda a, b, ij=ij: (ij(a, b)[0], 0))] * m
                + [pl.BlockSpec((d, bv), lambda a, b, ij=ij: (0, ij(a, b)[1]))] * m
                + [pl.BlockSpec((bn, 1), lambda a, b, ij=ij: (ij(a, b)[0], 0))] * len(names))
    kernel = functools.partial(_bwd_kernel, n_models=m, tok_names=names, dlogits=dlogits,
                               wrt=wrt, n=n, vocab=v, bn=bn, bv=bv, bd=bd, n_red=grid[1])
    grads.append(pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs,
        out_specs=pl.BlockSpec(out_block, out_map),
        out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
        scratch_shapes=[pltpu.VMEM(out_block, jnp.float32)],
        compiler_params=_params(("parallel", "arbitrary"), vmem),
        interpret=interpret, name=f"jpost_logprobs_d{wrt}",
    )(*hs, *ws, *cols))
  return tuple(grads)


# ------------------------------------------------------------------------ the implementation API

def lp_fwd(h, w, labels, spec):
  T, c, ent, v = spec.temperature, spec.softcap, spec.with_entropy, w.shape[1]

  def update(stats, tiles, col, lab):
    return tm.lp_update(stats, tiles[0], col, col < v, lab, T, c, True)

  def finish(stats):
    lse, zy, entropy = tm.lp_finish(stats)
    return (lse, zy) if entropy is None else (lse, zy, entropy)

  names = ("m", "l", "zy") + (("t",) if ent else ())
  stats = (names, lambda shape: tm.lp_init(shape, ent), update, finish)
  outs = _forward([h], [w], labels, spec, stats, 3 if ent else 2, spec.interpret)
  return outs[0], outs[1], (outs[2] if ent else None)


def lp_bwd(h, w, labels, lse, ent, g_lp, g_ent, spec):
  per_token, dlogits = tm.lp_backward(labels, lse, ent, g_lp, g_ent, spec.temperature,
                                      spec.softcap, True)
  return _backward([h], [w], per_token, spec, dlogits, spec.interpret)


def kl_fwd(h, w, h_ref, w_ref, labels, spec):
  T, c, v = spec.temperature, spec.softcap, w.shape[1]

  def update(stats, tiles, col, lab):
    del lab
    return tm.kl_update(stats, tiles[0], tiles[1], col < v, T, c, True)

  stats = (("m", "l", "mr", "lr", "k"), tm.kl_init, update, tm.kl_finish)
  kl, lse, lse_ref = _forward([h, h_ref], [w, w_ref], labels, spec, stats, 3, spec.interpret)
  return kl, lse, lse_ref


def kl_bwd(h, w, h_ref, w_ref, labels, lse, lse_ref, g, spec):
  del labels  # masked tokens already carry g = 0
  per_token, dlogits = tm.kl_backward(lse, lse_ref, g, spec.temperature, spec.softcap, True)
  return _backward([h, h_ref], [w, w_ref], per_token, spec, dlogits, spec.interpret)
