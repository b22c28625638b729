"""Triton (GPU) kernels for token_logprobs / token_kl.

JAX 0.10 lowers `pl.pallas_call` on CUDA to Mosaic GPU unless the compiler params are Triton's,
so every call here passes `plgpu.CompilerParams` (jax.experimental.pallas.triton).

All operands are whole arrays in global memory; each program loads power-of-two tiles with
`plgpu.load(ref.at[pl.ds(...)], mask=..., other=0)`, so ragged N, V and D need no padded copies
(masked-off elements read as 0, never as garbage).
Forward: grid (token tiles, vocabulary splits). A program walks its split's vocabulary tiles, each
logit tile accumulated over hidden chunks of bd in registers, and keeps online statistics; it
writes one partial (m, l, target, entropy sums) per token per split, merged in XLA (tile_math).
Backward: two kernels recompute the same logit tiles:
  dh: grid (token tiles, vocabulary splits), dh += dz @ w^T chunk by chunk into a float32
      [splits, N, D] buffer (summed in XLA);
  dw: grid (vocabulary tiles, token splits), dw += h^T @ dz into a float32 [splits, D, V] buffer.
A program owns its output rows, so accumulation is a read-modify-write without atomics
(deterministic); a CTA barrier orders each store before the next load of the same addresses,
which Triton may map to other threads. Splits trade parallelism for partial-sum memory.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jpost.ops import tile_math as tm
from jpost.ops.spec import next_pow2

DEFAULT_TOKEN_BLOCK = 64
DEFAULT_VOCAB_BLOCK = 128
DEFAULT_HIDDEN_BLOCK = 64
_TARGET_PROGRAMS = 264   # ~2 waves on a 132-SM H100; untuned
_MAX_GRAD_SPLITS = 4     # each split of dh / dw costs a float32 copy of that gradient


def _pow2_block(b, size, lo=16):
  if b & (b - 1):
    raise ValueError(f"pallas_gpu blocks must be powers of two, got {b}")
  return max(lo, min(b, next_pow2(size)))   # tl.dot needs every dimension >= 16


def _cfg(spec, n, d, v):
  b = spec.blocks
  bn = _pow2_block(b.token or DEFAULT_TOKEN_BLOCK, n)
  bv = _pow2_block(b.vocab or DEFAULT_VOCAB_BLOCK, v)
  bd = _pow2_block(b.hidden or DEFAULT_HIDDEN_BLOCK, d)
  params = plgpu.CompilerParams(num_warps=b.num_warps or 4, num_stages=b.num_stages or 3)
  return bn, bv, bd, params


def _splits(spec, programs, tiles, cap):
  """-> (tiles per split, number of splits); every split gets >= 1 tile."""
  s = spec.blocks.splits or -(-_TARGET_PROGRAMS // programs)
  s = max(1, min(s, tiles, cap))
  per = -(-tiles // s)
  return per, -(-tiles // per)


def _logits(h_ref, w_ref, r0, c0, bn, bv, bd, row_ok, col_ok):
  """[bn, bv] float32 logits of rows r0.. and columns c0.., summed over hidden chunks in order
  (the forward and both backward kernels call this, so they see identical logits)."""
  d = h_ref.shape[1]

  def chunk(k, acc):
    dk = k * bd + jnp.arange(bd)
    hk = plgpu.load(h_ref.at[pl.ds(r0, bn), pl.ds(k * bd, bd)],
                    mask=row_ok[:, None] & (dk < d)[None, :], other=0.0)
    wk = plgpu.load(w_ref.at[pl.ds(k * bd, bd), pl.ds(c0, bv)],
                    mask=(dk < d)[:, None] & col_ok[None, :], other=0.0)
    return acc + jnp.dot(hk, wk, preferred_element_type=jnp.float32)

  return lax.fori_loop(0, pl.cdiv(d, bd), chunk, jnp.zeros((bn, bv), jnp.float32))


def _load_tok(refs, names, r0, bn, row_ok):
  # Rows past N read as g = 0 (no gradient) and label -1 (masked).
  return {k: plgpu.load(r.at[pl.ds(r0, bn)], mask=row_ok, other=-1 if k == "labels" else 0.0)
          for k, r in zip(names, refs)}


# ------------------------------------------------------------------------------------- forward

def _fwd_kernel(*refs, m, n_stats, init, update, n, vocab, bn, bv, bd, per, nv):
  hs, ws, lab_ref = refs[:m], refs[m:2 * m], refs[2 * m]
  outs = refs[2 * m + 1:]
  i, s = pl.program_id(0), pl.program_id(1)
  rows = i * bn + jnp.arange(bn)
  row_ok = rows < n
  labels = plgpu.load(lab_ref.at[pl.ds(i * bn, bn)], mask=row_ok, other=-1)

  def vocab_step(j, stats):
    col = j * bv + jnp.arange(bv)
    col_ok = col < vocab
    tiles = [_logits(h, w, i * bn, j * bv, bn, bv, bd, row_ok, col_ok) for h, w in zip(hs, ws)]
    return update(stats, tiles, col[None, :], col_ok[None, :], labels)

  stats = lax.fori_loop(s * per, jnp.minimum(s * per + per, nv), vocab_step, init((bn,)))
  assert len(stats) == n_stats
  for ref, name in zip(outs, sorted(stats)):
    plgpu.store(ref.at[s, pl.ds(i * bn, bn)], stats[name], mask=row_ok)


def _forward(hs, ws, labels, spec, init, update):
  (n, d), v = hs[0].shape, ws[0].shape[1]
  bn, bv, bd, params = _cfg(spec, n, d, v)
  nt, nv = pl.cdiv(n, bn), pl.cdiv(v, bv)
  per, n_splits = _splits(spec, nt, nv, nv)
  names = sorted(init((1,)))
  kernel = functools.partial(_fwd_kernel, m=len(hs), n_stats=len(names), init=init,
                             update=update, n=n, vocab=v, bn=bn, bv=bv, bd=bd, per=per, nv=nv)
  parts = pl.pallas_call(
      kernel, grid=(nt, n_splits),
      out_shape=[jax.ShapeDtypeStruct((n_splits, n), jnp.float32)] * len(names),
      compiler_params=params, interpret=spec.interpret, name="jpost_logprobs_fwd",
  )(*hs, *ws, labels)
  return dict(zip(names, parts))


# ------------------------------------------------------------------------------------ backward

def _bwd_kernel(*refs, m, names, dlogits, wrt, n, vocab, bn, bv, bd, per, n_red, interpret):
  hs, ws = refs[:m], refs[m:2 * m]
  tok_refs, out_ref = refs[2 * m:2 * m + len(names)], refs[-1]
  outer, s = pl.program_id(0), pl.program_id(1)
  d = hs[0].shape[1]
  dtype = hs[0].dtype
  nd = pl.cdiv(d, bd)

  def zero(k, _):
    dk = k * bd + jnp.arange(bd)
    if wrt == "h":
      rows = outer * bn + jnp.arange(bn)
      plgpu.store(out_ref.at[s, pl.ds(outer * bn, bn), pl.ds(k * bd, bd)],
                  jnp.zeros((bn, bd), jnp.float32), mask=(rows < n)[:, None] & (dk < d)[None])
    else:
      col = outer * bv + jnp.arange(bv)
      plgpu.store(out_ref.at[s, pl.ds(k * bd, bd), pl.ds(outer * bv, bv)],
                  jnp.zeros((bd, bv), jnp.float32), mask=(dk < d)[:, None] & (col < vocab)[None])

  lax.fori_loop(0, nd, zero, None)

  def step(r, _):
    i, j = (outer, r) if wrt == "h" else (r, outer)
    rows, col = i * bn + jnp.arange(bn), j * bv + jnp.arange(bv)
    row_ok, col_ok = rows < n, col < vocab
    tiles = [_logits(h, w, i * bn, j * bv, bn, bv, bd, row_ok, col_ok) for h, w in zip(hs, ws)]
    tok = _load_tok(tok_refs, names, i * bn, bn, row_ok)
    da = dlogits(tiles, col[None, :], col_ok[None, :], tok).astype(dtype)

    def accumulate(k, _):
      dk = k * bd + jnp.arange(bd)
      d_ok = dk < d
      if wrt == "h":
        w_k = plgpu.load(ws[0].at[pl.ds(k * bd, bd), pl.ds(j * bv, bv)],
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        upd = jnp.dot(da, w_k.T, preferred_element_type=jnp.float32)        # [bn, bd]
        dst, mask = out_ref.at[s, pl.ds(i * bn, bn), pl.ds(k * bd, bd)], row_ok[:, None] & d_ok
      else:
        h_k = plgpu.load(hs[0].at[pl.ds(i * bn, bn), pl.ds(k * bd, bd)],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        upd = jnp.dot(h_k.T, da, preferred_element_type=jnp.float32)        # [bd, bv]
        dst, mask = out_ref.at[s, pl.ds(k * bd, bd), pl.ds(j * bv, bv)], d_ok[:, None] & col_ok
      if not interpret:        # no interpret rule; the interpreter is sequential anyway
        plgpu.debug_barrier()  # the previous store of these addresses is visible to all threads
      plgpu.store(dst, plgpu.load(dst, mask=mask, other=0.0) + upd, mask=mask)

    return lax.fori_loop(0, nd, accumulate, None)

  lax.fori_loop(s * per, jnp.minimum(s * per + per, n_red), step, None)


def _backward(hs, ws, tok, spec, dlogits):
  (n, d), v, dtype = hs[0].shape, ws[0].shape[1], hs[0].dtype
  bn, bv, bd, params = _cfg(spec, n, d, v)
  nt, nv = pl.cdiv(n, bn), pl.cdiv(v, bv)
  names = tuple(tok)
  grads = []
  for wrt in ("h", "w"):
    outer, n_red = (nt, nv) if wrt == "h" else (nv, nt)
    per, n_splits = _splits(spec, outer, n_red, _MAX_GRAD_SPLITS)
    shape = (n_splits, n, d) if wrt == "h" else (n_splits, d, v)
    kernel = functools.partial(_bwd_kernel, m=len(hs), names=names, dlogits=dlogits, wrt=wrt,
                               n=n, vocab=v, bn=bn, bv=bv, bd=bd, per=per, n_red=n_red,
                               interpret=spec.interpret)
    part = pl.pallas_call(
        kernel, grid=(outer, n_splits),
        out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
        compiler_params=params, interpret=spec.interpret, name=f"jpost_logprobs_d{wrt}",
    )(*hs, *ws, *(tok[k] for k in names))
    grads.append(jnp.sum(part, axis=0).astype(dtype))
  return tuple(grads)


# ------------------------------------------------------------------------ the implementation API

def lp_fwd(h, w, labels, spec):
  T, c, ent = spec.temperature, spec.softcap, spec.with_entropy

  def update(stats, tiles, col, valid, lab):
    return tm.lp_update(stats, tiles[0], col, valid, lab, T, c, False)

  parts = _forward([h], [w], labels, spec, lambda s: tm.lp_init(s, ent), update)
  return tm.lp_finish(tm.lp_merge(parts))


def lp_bwd(h, w, labels, lse, ent, g_lp, g_ent, spec):
  per_token, dlogits = tm.lp_backward(labels, lse, ent, g_lp, g_ent, spec.temperature,
                                      spec.softcap, False)
  return _backward([h], [w], per_token, spec, dlogits)


def kl_fwd(h, w, h_ref, w_ref, labels, spec):
  def update(stats, tiles, col, valid, lab):
    del col, lab
    return tm.kl_update(stats, tiles[0], tiles[1], valid, spec.temperature, spec.softcap, False)

  parts = _forward([h, h_ref], [w, w_ref], labels, spec, tm.kl_init, update)
  return tm.kl_finish(tm.kl_merge(parts))


def kl_bwd(h, w, h_ref, w_ref, labels, lse, lse_ref, g, spec):
  del labels  # masked tokens already carry g = 0
  per_token, dlogits = tm.kl_backward(lse, lse_ref, g, spec.temperature, spec.softcap, False)
  return _backward([h, h_ref], [w, w_ref], per_token, spec, dlogits)
