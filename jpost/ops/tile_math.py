"""Per-tile math shared by every tiled implementation (blockwise, pallas_tpu, pallas_gpu).

A tile is a [bn, bv] block of raw logits `a = h @ w` (float32 accumulation). Each function here is
plain jnp so the same code runs inside XLA loops, Mosaic kernels and Triton kernels. Per-token
statistics are carried either as [bn] vectors (`kd=False`: XLA and Triton, where 1-D vectors
broadcast with `[:, None]`) or as [bn, 1] columns (`kd=True`: Mosaic, where a 1-D vector would need
a relayout); `_b` makes either broadcast against the tile.

Online statistics (one pass over vocabulary tiles, float32, m = running max of z):
  l = sum exp(z - m)                     -> lse = m + log l
  t = sum exp(z - m) (z - m)             -> entropy H = lse - E_p[z] = log l - t / l
  when m grows to m':  l' = e^(m-m') l,  t' = e^(m-m') (t + (m - m') l)
Carrying t relative to m (not sum p z) keeps H accurate when |z| is large and H is small.
KL(q || p) with q = softmax(r) (reference), p = softmax(z), both maxima carried:
  k = sum exp(r - m_r) ((r - m_r) - (z - m_z))  -> KL = k / l_r - log l_r + log l_z
  when the maxima grow: k' = e^(m_r-m_r') (k + ((m_r - m_r') - (m_z - m_z')) l_r)
"""
import jax.numpy as jnp

NEG_INF = float("-inf")


def _b(x, kd):
  """A per-token statistic, shaped to broadcast against a [bn, bv] tile."""
  return x if kd else x[:, None]


def _rsum(x, kd):
  return jnp.sum(x, axis=1, keepdims=kd)


def _rmax(x, kd):
  return jnp.max(x, axis=1, keepdims=kd)


def transform(a, temperature, softcap):
  """Raw logits -> z = softcap * tanh(a / softcap) / temperature; also returns tanh for the VJP."""
  th = None
  z = a
  if softcap is not None:
    th = jnp.tanh(a * (1.0 / softcap))
    z = th * softcap
  if temperature != 1.0:
    z = z * (1.0 / temperature)
  return z, th


def chain(dz, th, temperature, softcap):
  """d/da of a loss given dz = d/dz: through the temperature and the soft-cap's tanh."""
  da = dz
  if temperature != 1.0:
    da = da * (1.0 / temperature)
  if softcap is not None:
    da = da * (1.0 - th * th)
  return da


def _online_rescale(m, m_tile):
  """New running max and the factor e^(m - m') for the old sums (0 on the first tile)."""
  m_new = jnp.maximum(m, m_tile)
  return m_new, jnp.exp(m - m_new)


# ---------------------------------------------------------------- log-prob (+ entropy) statistics

def lp_init(shape, with_entropy):
  zeros = jnp.zeros(shape, jnp.float32)
  stats = {"m": jnp.full(shape, NEG_INF, jnp.float32), "l": zeros, "zy": zeros}
  if with_entropy:
    stats["t"] = zeros
  return stats


def lp_update(stats, a, col, valid, labels, temperature, softcap, kd):
  """Folds one tile into the running statistics. `col` holds global vocabulary ids and `valid`
  the columns that count ([1, bv] or [bn, bv]); the others (padding, or columns an overlapping
  last tile already counted) are set to -inf before exp."""
  z, _ = transform(a, temperature, softcap)
  z = jnp.where(valid, z, NEG_INF)
  m, l = stats["m"], stats["l"]
  m_new, alpha = _online_rescale(m, _rmax(z, kd))
  e = jnp.exp(z - _b(m_new, kd))
  out = {"m": m_new, "l": alpha * l + _rsum(e, kd),
         # The target logit is picked by compare, never by a gather (no [N, V] index tensor).
         "zy": stats["zy"] + _rsum(jnp.where((col == _b(labels, kd)) & valid, z, 0.0), kd)}
  if "t" in stats:
    # Before the first tile m = -inf and l = 0: (m - m') * l would be nan, and must be 0.
    shift = jnp.where(l > 0, (m - m_new) * l, 0.0)
    # Padded columns: e = 0 but z - m' = -inf, so 0 * -inf; select instead of multiply.
    zrel = jnp.where(valid, e * (z - _b(m_new, kd)), 0.0)
    out["t"] = alpha * (stats["t"] + shift) + _rsum(zrel, kd)
  return out


def lp_finish(stats):
  """-> (lse, zy, entropy or None), unmasked (callers apply label < 0 masks)."""
  log_l = jnp.log(stats["l"])
  lse = stats["m"] + log_l
  ent = log_l - stats["t"] / stats["l"] if "t" in stats else None
  return lse, stats["zy"], ent


def lp_merge(parts):
  """Combines per-split statistics (each a [S, ...] array) along axis 0; every split must have
  seen at least one real column, so each m is finite."""
  m = jnp.max(parts["m"], axis=0)
  alpha = jnp.exp(parts["m"] - m)
  out = {"m": m, "l": jnp.sum(alpha * parts["l"], axis=0), "zy": jnp.sum(parts["zy"], axis=0)}
  if "t" in parts:
    out["t"] = jnp.sum(alpha * (parts["t"] + (parts["m"] - m) * parts["l"]), axis=0)
  return out


def lp_dlogits(a, col, valid, labels, lse, ent, g_lp, g_ent, temperature, softcap, kd):
  """Cotangent of the raw-logit tile for the loss sum(g_lp * logp + g_ent * H).

  dz = g_lp (onehot - p) - g_H p (log p + H). Masked tokens arrive with g = 0, hence dz = 0.
  """
  z, th = transform(a, temperature, softcap)
  logp = z - _b(lse, kd)
  p = jnp.where(valid, jnp.exp(logp), 0.0)
  onehot = (col == _b(labels, kd)).astype(jnp.float32)
  dz = _b(g_lp, kd) * (onehot - p)
  if g_ent is not None:
    dz = dz - _b(g_ent, kd) * p * (logp + _b(ent, kd))
  # Invalid columns may hold garbage logits in a kernel (NaN tanh included), or belong to
  # another tile: their cotangent must be exactly 0, so select after the chain rule.
  return jnp.where(valid, chain(dz, th, temperature, softcap), 0.0)


# ---------------------------------------------------------------- KL(ref || policy) statistics

def kl_init(shape):
  zeros = jnp.zeros(shape, jnp.float32)
  ninf = jnp.full(shape, NEG_INF, jnp.float32)
  return {"m": ninf, "l": zeros, "mr": ninf, "lr": zeros, "k": zeros}


def kl_update(stats, a, ar, valid, temperature, softcap, kd):
  z, _ = transform(a, temperature, softcap)
  r, _ = transform(ar, temperature, softcap)
  z = jnp.where(valid, z, NEG_INF)
  r = jnp.where(valid, r, NEG_INF)
  m, mr, lr = stats["m"], stats["mr"], stats["lr"]
  m_new, alpha = _online_rescale(m, _rmax(z, kd))
  mr_new, alpha_r = _online_rescale(mr, _rmax(r, kd))
  er = jnp.exp(r - _b(mr_new, kd))
  # Both logits relative to their own max, so k stays O(logit range), not O(|lse|): KL is a
  # small difference of large numbers when taken as E_q[r - z] - lse_r + lse_z.
  rel = (r - _b(mr_new, kd)) - (z - _b(m_new, kd))
  diff = jnp.where(valid, er * rel, 0.0)   # padded: 0 * (-inf - -inf) would be nan
  shift = jnp.where(lr > 0, ((mr - mr_new) - (m - m_new)) * lr, 0.0)
  return {"m": m_new, "l": alpha * stats["l"] + _rsum(jnp.exp(z - _b(m_new, kd)), kd),
          "mr": mr_new, "lr": alpha_r * lr + _rsum(er, kd),
          "k": alpha_r * (stats["k"] + shift) + _rsum(diff, kd)}


def kl_finish(stats):
  """-> (kl, lse, lse_ref), unmasked."""
  log_l, log_lr = jnp.log(stats["l"]), jnp.log(stats["lr"])
  return (stats["k"] / stats["lr"] - log_lr + log_l,
          stats["m"] + log_l, stats["mr"] + log_lr)


def kl_merge(parts):
  m = jnp.max(parts["m"], axis=0)
  mr = jnp.max(parts["mr"], axis=0)
  alpha = jnp.exp(parts["m"] - m)
  alpha_r = jnp.exp(parts["mr"] - mr)
  shift = ((parts["mr"] - mr) - (parts["m"] - m)) * parts["lr"]
  return {"m": m, "l": jnp.sum(alpha * parts["l"], axis=0),
          "mr": mr, "lr": jnp.sum(alpha_r * parts["lr"], axis=0),
          "k": jnp.sum(alpha_r * (parts["k"] + shift), axis=0)}


def kl_dlogits(a, ar, valid, lse, lse_r, g, temperature, softcap, kd):
  """d KL(q || p) / dz = p - q (the reference side gets no gradient)."""
  z, th = transform(a, temperature, softcap)
  r, _ = transform(ar, temperature, softcap)
  p = jnp.exp(z - _b(lse, kd))
  q = jnp.exp(r - _b(lse_r, kd))
  return jnp.where(valid, chain(_b(g, kd) * (p - q), th, temperature, softcap), 0.0)


# ---------------------------------------------------------------- backward wiring

def lp_backward(labels, lse, ent, g_lp, g_ent, temperature, softcap, kd):
  """(per-token operands, dlogits(tiles, col, valid, t)) for the log-prob backward of any impl.

  Entropy operands are carried only when the entropy output has a cotangent.
  """
  per_token = {"labels": labels, "lse": lse, "g_lp": g_lp}
  if g_ent is not None:
    per_token.update(ent=ent, g_ent=g_ent)

  def dlogits(tiles, col, valid, t):
    return lp_dlogits(tiles[0], col, valid, t["labels"], t["lse"], t.get("ent"), t["g_lp"],
                      t.get("g_ent"), temperature, softcap, kd)

  return per_token, dlogits


def kl_backward(lse, lse_ref, g, temperature, softcap, kd):
  """(per-token operands, dlogits) for the KL backward; masked tokens already carry g = 0."""

  def dlogits(tiles, col, valid, t):
    del col
    return kl_dlogits(tiles[0], tiles[1], valid, t["lse"], t["lse_ref"], t["g"],
                      temperature, softcap, kd)

  return {"lse": lse, "lse_ref": lse_ref, "g": g}, dlogits
