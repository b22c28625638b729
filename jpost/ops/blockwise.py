"""Pure-jnp tiled implementation: XLA loops over token and vocabulary tiles; runs on any backend.

Forward: `lax.map` over token tiles, inside it a `fori_loop` over vocabulary tiles carrying the
online statistics of tile_math; only per-token vectors leave the loop.
Backward: the outer loop runs over vocabulary tiles and the inner one over token tiles, so the
float32 accumulators are dh [N, D] (carried across the whole loop) and one dw tile [D, bv] (cast to
the weight dtype when the tile is done). The other order would need a float32 [D, V] accumulator,
which for Llama-3 vocabularies is larger than the logits of a small batch.

Ragged sizes without copies: padding w to a multiple of the tile would copy all of w (1 GiB for a
4096 x 128256 bf16 head). Instead the last tile starts early (at V - bv, resp. N - bn) and masks
what an earlier tile already covered: columns to -inf in the statistics, rows to zero cotangent.
In the backward the vocabulary tiles run last-to-first, so the correct dw columns of tile nV-2
overwrite the zeros the overlapping last tile wrote for them.
"""
import jax
import jax.numpy as jnp
from jax import lax

from jpost.ops import tile_math as tm

# Tile sizes (tokens, vocabulary) per backend. cpu: chosen so value_and_grad at N=4096, D=256,
# V=32768 (bf16) stays under 5% of the [N, V] float32 logits (tests/ops/test_memory.py). Others:
# 8 MiB float32 tiles, big enough to keep matmuls efficient; not yet tuned on hardware.
DEFAULT_BLOCKS = {"cpu": (512, 512), "gpu": (1024, 2048), "tpu": (1024, 2048)}
_TN = (((1,), (1,)), ((), ()))   # da[bn, bv] . w[D, bv]^T -> [bn, D]
_NT = (((0,), (0,)), ((), ()))   # h[bn, D]^T . da[bn, bv] -> [D, bv]


def _blocks(spec, n, v):
  bn, bv = DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS["gpu"])
  return min(spec.blocks.token or bn, n), min(spec.blocks.vocab or bv, v)


def _starts(j, size, total):
  """Start of tile j and the first index it owns (< start only for the clamped last tile)."""
  return jnp.minimum(j * size, total - size), j * size


def _as_storage(x):
  """How an operand that loops slice or update is held. XLA:CPU has no bf16/f16 dynamic-slice
  or dynamic-update-slice: its float normalisation converts the whole operand to float32 around
  each one (for w: a float32 copy hoisted out of the loop; for dw: a full convert on every
  vocabulary tile, 2x slower overall). The same bits as uint16 are sliced natively; XLA:CPU
  still materialises the bitcast of w (one weights-sized copy). Other backends: unchanged."""
  if jax.default_backend() == "cpu" and x.dtype in (jnp.bfloat16, jnp.float16):
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def _tile(x, start, size, axis, dtype):
  """One tile of a stored operand, back in its float dtype. The barrier keeps XLA from turning
  convert(slice(x)) into slice(convert(x)) and hoisting the full-size convert out of the loop."""
  t = lax.dynamic_slice_in_dim(x, start, size, axis)
  if t.dtype != dtype:
    t = lax.bitcast_convert_type(t, dtype)
  return lax.optimization_barrier(t)


def _dot(x, y):
  return jnp.dot(x, y, preferred_element_type=jnp.float32)


def _forward(hs, ws, labels, spec, init, update):
  """Online statistics for every token; hs / ws are (policy,) or (policy, reference)."""
  n, vocab, dtype = hs[0].shape[0], ws[0].shape[1], ws[0].dtype
  bn, bv = _blocks(spec, n, vocab)
  n_tiles = -(-n // bn)
  hs = [_as_storage(h) for h in hs]
  ws = [_as_storage(w) for w in ws]

  def token_tile(i):
    start, _ = _starts(i, bn, n)
    h_tiles = [_tile(h, start, bn, 0, dtype) for h in hs]
    lab = lax.dynamic_slice_in_dim(labels, start, bn)

    def vocab_step(j, stats):
      v_start, owned = _starts(j, bv, vocab)
      col = v_start + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
      tiles = [_dot(h, _tile(w, v_start, bv, 1, dtype)) for h, w in zip(h_tiles, ws)]
      return update(stats, tiles, col, col >= owned, lab)

    return lax.fori_loop(0, -(-vocab // bv), vocab_step, init((bn,)))

  stats = lax.map(token_tile, jnp.arange(n_tiles))
  # The last tile's first (n_tiles * bn - n) rows repeat rows of the tile before it.
  return {k: jnp.concatenate([s[:-1].reshape(-1), s[-1, n_tiles * bn - n:]])
          for k, s in stats.items()}


def _backward(hs, ws, per_token, spec, dlogits):
  """dh, dw of sum over tiles of <dlogits(tiles), h @ w>; per_token: dict of [N] vectors whose
  entries named g* are cotangents (zeroed on rows a tile does not own)."""
  (n, d), vocab, dtype = hs[0].shape, ws[0].shape[1], ws[0].dtype
  bn, bv = _blocks(spec, n, vocab)
  n_vocab_tiles = -(-vocab // bv)
  hs = [_as_storage(x) for x in hs]
  ws = [_as_storage(x) for x in ws]

  def vocab_step(step, carry):
    dh, dw = carry
    v_start, owned = _starts(n_vocab_tiles - 1 - step, bv, vocab)   # last tile first, see top
    col = v_start + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    valid = col >= owned
    w_tiles = [_tile(x, v_start, bv, 1, dtype) for x in ws]

    def token_step(i, inner):
      dh, dw_tile = inner
      start, first = _starts(i, bn, n)
      h_tiles = [_tile(x, start, bn, 0, dtype) for x in hs]
      own_row = start + jnp.arange(bn) >= first
      tok = {k: lax.dynamic_slice_in_dim(x, start, bn) for k, x in per_token.items()}
      tok = {k: jnp.where(own_row, x, 0.0) if k.startswith("g") else x for k, x in tok.items()}
      tiles = [_dot(a, b) for a, b in zip(h_tiles, w_tiles)]
      # The matmuls run in the input dtype (bf16 on accelerators) with float32 accumulation.
      da = dlogits(tiles, col, valid, tok).astype(dtype)
      dh_tile = lax.dot_general(da, w_tiles[0], _TN, preferred_element_type=jnp.float32)
      dh = lax.dynamic_update_slice_in_dim(
          dh, lax.dynamic_slice_in_dim(dh, start, bn, 0) + dh_tile, start, 0)
      dw_tile = dw_tile + lax.dot_general(h_tiles[0], da, _NT,
                                          preferred_element_type=jnp.float32)
      return dh, dw_tile

    dh, dw_tile = lax.fori_loop(0, -(-n // bn), token_step,
                                (dh, jnp.zeros((d, bv), jnp.float32)))
    dw_tile = dw_tile.astype(dtype)
    if dw.dtype != dtype:
      dw_tile = lax.bitcast_convert_type(dw_tile, dw.dtype)
    return dh, lax.dynamic_update_slice_in_dim(dw, dw_tile, v_start, 1)

  dh, dw = lax.fori_loop(0, n_vocab_tiles, vocab_step,
                         (jnp.zeros((n, d), jnp.float32),
                          _as_storage(jnp.zeros((d, vocab), dtype))))
  if dw.dtype != dtype:
    dw = lax.bitcast_convert_type(dw, dtype)
  return dh.astype(dtype), dw


def lp_fwd(h, w, labels, spec):
  def update(stats, tiles, col, valid, lab):
    return tm.lp_update(stats, tiles[0], col, valid, lab, spec.temperature, spec.softcap, False)

  stats = _forward([h], [w], labels, spec, lambda s: tm.lp_init(s, spec.with_entropy), update)
  return tm.lp_finish(stats)


def lp_bwd(h, w, labels, lse, ent, g_lp, g_ent, spec):
  per_token, dlogits = tm.lp_backward(labels, lse, ent, g_lp, g_ent, spec.temperature,
                                      spec.softcap, False)
  return _backward([h], [w], per_token, spec, dlogits)


def kl_fwd(h, w, h_ref, w_ref, labels, spec):
  def update(stats, tiles, col, valid, lab):
    del col, lab
    return tm.kl_update(stats, tiles[0], tiles[1], valid, spec.temperature, spec.softcap, False)

  return tm.kl_finish(_forward([h, h_ref], [w, w_ref], labels, spec, tm.kl_init, update))


def kl_bwd(h, w, h_ref, w_ref, labels, lse, lse_ref, g, spec):
  del labels  # masked tokens already carry g = 0
  per_token, dlogits = tm.kl_backward(lse, lse_ref, g, spec.temperature, spec.softcap, False)
  return _backward([h, h_ref], [w, w_ref], per_token, spec, dlogits)
