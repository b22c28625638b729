"""policy_gradient.loss against NumPy references written from ALGORITHMS.md §4.

Sequences are described as a list (per-token log-probs, advantages, ...); `_batch` packs them into
rows (prompt tokens, several sequences per row, padding, a padding example slot), and the NumPy
references work on the list, so packing/masking bugs in the loss cannot cancel in the reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost.losses import policy_gradient as pg

RTOL, ATOL = 1e-5, 1e-6


def _batch(seqs, layout, T=16, prompt=2):
  """seqs: dicts with 'lp' [n] and optional per-token 'old', 'adv', 'ref', 'ent', 'sampler',
  'offline', 'sft' ([n] arrays). layout: rows as lists of sequence ids. Returns (logps, batch).

  Shapes are fixed (B = 3 rows, S = 8 example slots, T = 16 unless asked; empty rows and invalid
  example slots pad the rest) so that eager JAX reuses its compiled ops across tests.
  """
  B, S = max(3, len(layout)), 8
  assert len(seqs) < S                       # at least one invalid example slot
  z = lambda dtype=np.float32: np.zeros((B, T), dtype)
  lp, old, adv, ref, ent, sampler, off, sft = (z() for _ in range(8))
  mask, seq_index = z(), np.full((B, T), -1, np.int32)
  for b, row in enumerate(layout):
    t = 0
    for s in row:
      d = seqs[s]
      n = len(d["lp"])
      seq_index[b, t:t + prompt + n] = s
      sl = slice(t + prompt, t + prompt + n)
      mask[b, sl] = 1
      lp[b, sl] = d["lp"]
      old[b, sl] = d.get("old", d["lp"])
      adv[b, sl] = d.get("adv", np.zeros(n))
      ref[b, sl] = d.get("ref", np.zeros(n))
      ent[b, sl] = d.get("ent", np.zeros(n))
      sampler[b, sl] = d.get("sampler", np.zeros(n))
      off[b, sl] = d.get("offline", np.zeros(n))
      sft[b, sl] = d.get("sft", np.zeros(n))
      t += prompt + n
    assert t <= T
  valid = np.zeros(S, np.float32)
  valid[:len(seqs)] = 1
  batch = dict(loss_mask=mask, seq_index=seq_index, example_valid=valid, advantages=adv,
               old_logp=old, sampler_logp=sampler)
  if any("offline" in d for d in seqs):
    batch["offline_mask"] = off
  if any("sft" in d for d in seqs):
    batch["sft_mask"] = sft
  logps = dict(policy=jnp.asarray(lp), ref=jnp.asarray(ref), entropy=jnp.asarray(ent))
  return logps, batch


def _cfg(**kw):
  c = pg.default_config()
  c.lock()              # a misspelled key in a test fails instead of being ignored
  c.update(kw)
  return c


def _grad(logps, batch, cfg):
  return np.asarray(jax.grad(lambda x: pg.loss(dict(logps, policy=x), batch, cfg)[0])(
      logps["policy"]))


def _token_grads(seqs, layout, grads, prompt=2):
  """The [B, T] gradient back as per-sequence lists (inverse of _batch's placement)."""
  out = {}
  for b, row in enumerate(layout):
    t = 0
    for s in row:
      n = len(seqs[s]["lp"])
      out[s] = grads[b, t + prompt:t + prompt + n]
      t += prompt + n
  return out


# ------------------------------------------------------------------ NumPy reference (the spec)

def np_token_loss(clip, r, a, lp, eps_low=0.2, eps_high=0.2, c=3.0):
  if clip == "none":
    return -r * a
  if clip == "cispo":
    return -np.minimum(r, 1 + eps_high) * a * lp
  out = -np.minimum(r * a, np.clip(r, 1 - eps_low, 1 + eps_high) * a)
  if clip == "dual":
    out = np.where(a < 0, np.minimum(out, -c * a), out)
  return out


def np_ratio(kind, d, gamma=0.1, shaping=False):
  lp, old = np.asarray(d["lp"], np.float64), np.asarray(d.get("old", d["lp"]), np.float64)
  if kind == "on_policy":
    return np.exp(np.clip(lp - old, -20, 20))
  if kind == "sequence":
    return np.full(lp.shape, np.exp(np.mean(lp - old)))
  if kind == "none":
    return np.ones(lp.shape)
  p = np.exp(lp)
  return p / (p + gamma) if shaping else p


def np_aggregate(per_token, agg, n_valid, max_len=None):
  """per_token: list of per-sequence arrays."""
  if agg == "token_mean":
    return sum(x.sum() for x in per_token) / sum(len(x) for x in per_token)
  if agg == "seq_mean_token_mean":
    return sum(x.mean() for x in per_token) / n_valid
  return sum(x.sum() for x in per_token) / (n_valid * max_len)


def _random_seqs(rng, lengths, spread=0.5):
  seqs = []
  for i, n in enumerate(lengths):
    lp = rng.uniform(-3, -0.05, n)
    seqs.append(dict(lp=lp, old=lp + rng.uniform(-spread, spread, n),
                     adv=np.full(n, rng.normal()), ref=lp + rng.uniform(-1, 1, n),
                     ent=rng.uniform(0.1, 3, n), sampler=lp + rng.uniform(-0.2, 0.2, n)))
  return seqs


LENGTHS = [3, 7, 1, 5, 4]
LAYOUT = [[0, 2], [1], [3, 4]]      # row 0 and row 2 are packed with two sequences each
T = 16


# --------------------------------------------------------------------------- clip branches

def _one_row(ratios, advs, lp=-1.0):
  """One sequence whose token t has ratio ratios[t] and advantage advs[t]."""
  n = len(ratios)
  lp_ = np.full(n, lp)
  d = dict(lp=lp_, old=lp_ - np.log(ratios), adv=np.asarray(advs, np.float64))
  return [d], [[0]]


def test_ppo_clip_gradient_branches_both_signs():
  # Token: (ratio, advantage, gradient flows?). A < 0 and rho < 1 - eps_low: zero (the objective
  # is already pessimistic); A < 0 and rho > 1 + eps_high: the gradient FLOWS (the unclipped term
  # is the min). A > 0 mirrors it.
  cases = [(0.5, -1.0, False), (1.5, -1.0, True), (1.0, -1.0, True), (0.9, -2.0, True),
           (1.5, 1.0, False), (0.5, 1.0, True), (1.1, 2.0, True), (0.79, -0.5, False),
           (1.21, -0.5, True), (1.21, 0.5, False), (0.79, 0.5, True)]
  ratios, advs, flows = map(np.array, zip(*cases))
  seqs, layout = _one_row(ratios, advs)
  logps, batch = _batch(seqs, layout)
  cfg = _cfg(loss_agg="token_mean")
  g = _token_grads(seqs, layout, _grad(logps, batch, cfg))[0]
  n = len(cases)
  # d/dlp of -rho A is -rho A (d rho / d lp = rho); divided by the token count.
  expected = np.where(flows, -ratios * advs / n, 0.0)
  np.testing.assert_allclose(g, expected, rtol=RTOL, atol=ATOL)
  assert np.all((g != 0) == flows)
  loss, metrics = pg.loss(logps, batch, cfg)
  ref = np_token_loss("ppo", ratios, advs, seqs[0]["lp"]).mean()
  np.testing.assert_allclose(loss, ref, rtol=RTOL)
  # Clip fractions count exactly the gradient-free tokens, by side.
  np.testing.assert_allclose(metrics["pg/clip_frac_low"], np.sum((ratios < 0.8) & (advs < 0)) / n)
  np.testing.assert_allclose(metrics["pg/clip_frac_high"], np.sum((ratios > 1.2) & (advs > 0)) / n)


def test_asymmetric_eps_dapo():
  ratios = np.array([1.25, 1.25, 1.3, 0.75, 0.85])
  advs = np.array([1.0, -1.0, 1.0, -1.0, -1.0])
  seqs, layout = _one_row(ratios, advs)
  logps, batch = _batch(seqs, layout)
  cfg = _cfg(loss_agg="token_mean", eps_low=0.2, eps_high=0.28)
  g = _token_grads(seqs, layout, _grad(logps, batch, cfg))[0]
  flows = np.array([True, True, False, False, True])    # 1.25 < 1.28 still flows for A > 0
  np.testing.assert_allclose(g, np.where(flows, -ratios * advs / 5, 0.0), rtol=RTOL, atol=ATOL)


def test_dual_clip():
  c = 3.0
  cases = [(4.0, -1.0, False), (2.0, -1.0, True), (0.5, -1.0, False), (4.0, 1.0, False),
           (0.5, 1.0, True), (3.5, -2.0, False), (2.9, -2.0, True)]
  ratios, advs, flows = map(np.array, zip(*cases))
  seqs, layout = _one_row(ratios, advs)
  logps, batch = _batch(seqs, layout)
  cfg = _cfg(loss_agg="token_mean", clip="dual", dual_c=c)
  n = len(cases)
  g = _token_grads(seqs, layout, _grad(logps, batch, cfg))[0]
  np.testing.assert_allclose(g, np.where(flows, -ratios * advs / n, 0.0), rtol=RTOL, atol=ATOL)
  loss, metrics = pg.loss(logps, batch, cfg)
  per_token = np_token_loss("dual", ratios, advs, seqs[0]["lp"], c=c)
  # The capped tokens are worth exactly c |A|.
  np.testing.assert_allclose(per_token[[0, 5]], c * np.abs(advs[[0, 5]]))
  np.testing.assert_allclose(loss, per_token.mean(), rtol=RTOL)
  np.testing.assert_allclose(metrics["pg/clip_frac_dual"], 2 / n)


def test_cispo_gradient_is_truncated_weight_times_advantage():
  ratios = np.array([0.5, 1.0, 1.1, 1.5, 3.0, 0.3])
  advs = np.array([1.0, -1.0, 2.0, 1.0, -1.5, -0.7])
  seqs, layout = _one_row(ratios, advs, lp=-0.7)
  logps, batch = _batch(seqs, layout)
  cfg = _cfg(loss_agg="token_mean", clip="cispo", eps_high=0.28)
  g = _token_grads(seqs, layout, _grad(logps, batch, cfg))[0]
  n = len(ratios)
  # Every token keeps a gradient (no token is clipped out), weighted by sg(min(rho, 1+eps_high)).
  np.testing.assert_allclose(g, -np.minimum(ratios, 1.28) * advs / n, rtol=RTOL, atol=ATOL)
  loss, metrics = pg.loss(logps, batch, cfg)
  np.testing.assert_allclose(loss, np_token_loss("cispo", ratios, advs, seqs[0]["lp"], eps_high=0.28)
                             .mean(), rtol=RTOL)
  np.testing.assert_allclose(metrics["pg/clip_frac_high"], 2 / n)


def test_gspo_every_token_gets_the_sequence_ratio():
  rng = np.random.default_rng(1)
  seqs = _random_seqs(rng, LENGTHS, spread=0.05)
  seqs[1]["old"] = seqs[1]["lp"] - 0.5          # log s = 0.5: clipped for A > 0 ...
  seqs[1]["adv"] = np.full(7, 1.0)
  seqs[3]["old"] = seqs[3]["lp"] - 0.5          # ... but not for A < 0
  seqs[3]["adv"] = np.full(5, -1.0)
  logps, batch = _batch(seqs, LAYOUT)
  cfg = _cfg(ratio="sequence", eps_low=0.2, eps_high=0.2)
  loss, metrics = pg.loss(logps, batch, cfg)
  s = [np_ratio("sequence", d)[0] for d in seqs]
  a = [d["adv"][0] for d in seqs]
  per_seq = [np_token_loss("ppo", np.full(len(d["lp"]), si), d["adv"], d["lp"])
             for d, si in zip(seqs, s)]
  np.testing.assert_allclose(loss, np_aggregate(per_seq, "seq_mean_token_mean", len(seqs)),
                             rtol=RTOL)
  g = _token_grads(seqs, LAYOUT, _grad(logps, batch, cfg))
  for i, d in enumerate(seqs):
    n = len(d["lp"])
    clipped = (s[i] > 1.2 and a[i] > 0) or (s[i] < 0.8 and a[i] < 0)
    want = 0.0 if clipped else -s[i] * a[i] / (n * len(seqs))
    np.testing.assert_allclose(g[i], np.full(n, want), rtol=RTOL, atol=ATOL)
  assert np.all(g[1] == 0) and np.all(g[3] != 0)
  np.testing.assert_allclose(metrics["pg/ratio_max"], max(s), rtol=RTOL)


# ----------------------------------------------------------------------------- aggregation

@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("clip", ["ppo", "none", "cispo"])
def test_aggregations_match_numpy(agg, clip):
  rng = np.random.default_rng(0)
  seqs = _random_seqs(rng, LENGTHS)
  logps, batch = _batch(seqs, LAYOUT)
  cfg = _cfg(loss_agg=agg, clip=clip, max_completion_len=9)
  loss, _ = pg.loss(logps, batch, cfg)
  per_seq = [np_token_loss(clip, np_ratio("on_policy", d), d["adv"], d["lp"]) for d in seqs]
  np.testing.assert_allclose(loss, np_aggregate(per_seq, agg, len(seqs), 9), rtol=RTOL)


def _split(seqs, layout, rows_per_part):
  """Micro-batches of whole rows; sequence ids renumbered inside each micro-batch."""
  parts = []
  for rows in rows_per_part:
    ids = [s for r in rows for s in layout[r]]
    sub = [seqs[s] for s in ids]
    sub_layout = [[ids.index(s) for s in layout[r]] for r in rows]
    parts.append((sub, sub_layout))
  return parts


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("mixed", [False, True])
def test_additive_over_micro_batches(agg, mixed):
  rng = np.random.default_rng(2)
  seqs = _random_seqs(rng, LENGTHS, spread=0.4)
  n_tok = n_on = sum(LENGTHS)
  if mixed:      # a demonstration in each micro-batch: on-policy metrics need their own totals
    for i in (1, 2):
      seqs[i]["offline"] = np.ones(LENGTHS[i])
      n_on -= LENGTHS[i]
  cfg = _cfg(loss_agg=agg, max_completion_len=9, kl_beta=0.1, entropy_coef=0.01,
             offline_shaping=True)
  logps, batch = _batch(seqs, LAYOUT)
  full_loss, full_metrics = pg.loss(logps, batch, cfg)
  total_loss, sums, maxes = 0.0, {}, {}
  for sub, sub_layout in _split(seqs, LAYOUT, [[0, 2], [1]]):
    lg, b = _batch(sub, sub_layout)
    b = dict(b, denom_tokens=np.float32(n_tok), denom_examples=np.float32(len(seqs)))
    if mixed:
      b.update(denom_onpolicy_tokens=np.float32(n_on), denom_sampled_tokens=np.float32(n_on))
    loss, metrics = pg.loss(lg, b, cfg)
    total_loss += loss
    for k, v in metrics.items():
      if k.endswith("_max"):
        maxes[k] = max(maxes.get(k, -np.inf), float(v))
      else:
        sums[k] = sums.get(k, 0.0) + float(v)
  np.testing.assert_allclose(total_loss, full_loss, rtol=RTOL)
  for k, v in full_metrics.items():
    np.testing.assert_allclose((maxes if k.endswith("_max") else sums)[k], v, rtol=RTOL, atol=ATOL,
                               err_msg=k)


# --------------------------------------------------------------------------------- metrics

def test_metrics_match_numpy():
  rng = np.random.default_rng(3)
  seqs = _random_seqs(rng, LENGTHS, spread=0.6)
  logps, batch = _batch(seqs, LAYOUT)
  _, m = pg.loss(logps, batch, _cfg(kl="k1"))
  lp = np.concatenate([d["lp"] for d in seqs])
  r = np.concatenate([np_ratio("on_policy", d) for d in seqs])
  a = np.concatenate([d["adv"] for d in seqs])
  old = np.concatenate([d["old"] for d in seqs])
  gap = np.abs(np.concatenate([d["sampler"] for d in seqs]) - old)
  want = {"pg/ratio_mean": r.mean(), "pg/ratio_max": r.max(),
          "pg/clip_frac_low": np.mean((r < 0.8) & (a < 0)),
          "pg/clip_frac_high": np.mean((r > 1.2) & (a > 0)),
          "pg/kl": np.mean(lp - np.concatenate([d["ref"] for d in seqs])),
          "pg/entropy": np.concatenate([d["ent"] for d in seqs]).mean(),
          "pg/logp_gap_mean": gap.mean(), "pg/logp_gap_max": gap.max()}
  assert want["pg/clip_frac_low"] + want["pg/clip_frac_high"] > 0   # the case is exercised
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=RTOL, atol=ATOL, err_msg=k)


# ---------------------------------------------------------------------------------- KL, entropy

@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_in_the_loss(kind):
  rng = np.random.default_rng(4)
  seqs = _random_seqs(rng, LENGTHS)
  for d in seqs:
    d["adv"] = np.zeros(len(d["lp"]))                 # isolate the KL term
  logps, batch = _batch(seqs, LAYOUT)
  beta = 0.3
  loss, m = pg.loss(logps, batch, _cfg(kl=kind, kl_beta=beta, loss_agg="token_mean"))
  u = np.concatenate([d["ref"] - d["lp"] for d in seqs])
  k = {"k1": -u, "k2": u ** 2 / 2, "k3": np.exp(u) - u - 1}[kind]
  np.testing.assert_allclose(loss, beta * k.mean(), rtol=RTOL)
  np.testing.assert_allclose(m["pg/kl"], k.mean(), rtol=RTOL)
  # Placement 'reward' leaves the loss alone (the penalty lives in the rewards).
  loss_r, _ = pg.loss(logps, batch, _cfg(kl=kind, kl_beta=beta, kl_placement="reward"))
  assert float(loss_r) == 0.0


def test_k3_clamps():
  lp = jnp.array([0.0, 0.0, 0.0, 0.0])
  ref = jnp.array([25.0, -25.0, -5.0, 2.0])           # u = ref - lp
  val = np.asarray(pg.kl_penalty("k3", lp, ref))
  np.testing.assert_allclose(val, [10.0, 10.0, np.exp(-5) + 4, np.exp(2) - 3], rtol=RTOL)
  grad = np.asarray(jax.grad(lambda x: pg.kl_penalty("k3", x, ref).sum())(lp))
  # Clamped entries carry no gradient; otherwise d/dlp (e^u - u - 1) = 1 - e^u.
  np.testing.assert_allclose(grad, [0.0, 0.0, 1 - np.exp(-5), 1 - np.exp(2)], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(pg.kl_penalty("k1", lp, ref), -ref)
  np.testing.assert_allclose(pg.kl_penalty("k2", lp, ref), ref ** 2 / 2)


def test_entropy_bonus_raises_entropy():
  rng = np.random.default_rng(5)
  n, V = 6, 11
  logits = jnp.asarray(rng.normal(size=(n, V)) * 2)
  targets = rng.integers(0, V, n)
  seqs = [dict(lp=np.zeros(n))]
  _, batch = _batch(seqs, [[0]])
  cfg = _cfg(entropy_coef=0.5, loss_agg="token_mean")

  def loss_of(z):
    logp = jax.nn.log_softmax(z)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    pad = lambda x: jnp.zeros((3, T)).at[0, 2:2 + n].set(x)   # after the 2 prompt positions
    return pg.loss(dict(policy=pad(logp[jnp.arange(n), targets]), entropy=pad(ent)), batch, cfg)[0]

  def mean_entropy(z):
    p = jax.nn.softmax(z)
    return float(-jnp.sum(p * jnp.log(p)) / n)

  step = logits - 0.5 * jax.grad(loss_of)(logits)        # advantages are 0: only the bonus acts
  assert mean_entropy(step) > mean_entropy(logits)
  # And the loss is -coef * token-mean(H).
  np.testing.assert_allclose(loss_of(logits), -0.5 * mean_entropy(logits), rtol=RTOL)


# --------------------------------------------------------------------- demonstrations (§5)

@pytest.mark.parametrize("shaping", [False, True])
def test_offline_ratio_mixed_with_on_policy(shaping):
  rng = np.random.default_rng(6)
  seqs = _random_seqs(rng, LENGTHS, spread=0.4)
  seqs[1]["offline"] = np.ones(7)                    # the demonstration row of a LUFFY group
  seqs[1]["old"] = np.full(7, np.nan)                # no behaviour policy: must be ignored
  seqs[1]["adv"] = np.full(7, 1.3)
  seqs[4]["offline"] = np.ones(4)
  seqs[4]["old"] = np.full(4, np.nan)
  seqs[4]["adv"] = np.full(4, -0.8)
  logps, batch = _batch(seqs, LAYOUT)
  gamma = 0.1
  cfg = _cfg(offline_shaping=shaping, offline_gamma=gamma, loss_agg="token_mean")
  loss, m = pg.loss(logps, batch, cfg)
  per_seq = []
  for d in seqs:
    if "offline" in d:     # demonstration tokens: offline ratio, no clip
      per_seq.append(np_token_loss("none", np_ratio("offline", d, gamma, shaping), d["adv"], d["lp"]))
    else:
      per_seq.append(np_token_loss("ppo", np_ratio("on_policy", d), d["adv"], d["lp"]))
  np.testing.assert_allclose(loss, np_aggregate(per_seq, "token_mean", len(seqs)), rtol=RTOL)
  g = _token_grads(seqs, LAYOUT, _grad(logps, batch, cfg))
  assert all(np.all(np.isfinite(x)) for x in g.values())
  for i in (1, 4):
    p, a = np.exp(seqs[i]["lp"]), seqs[i]["adv"]
    # d/dlp of -A f(p): f(p) = p -> -A p;  f(p) = p / (p + gamma) -> -A gamma p / (p + gamma)^2.
    want = -a * (gamma * p / (p + gamma) ** 2 if shaping else p) / sum(LENGTHS)
    np.testing.assert_allclose(g[i], want, rtol=RTOL, atol=ATOL)
  # On-policy metrics cover the on-policy tokens only.
  r_on = np.concatenate([np_ratio("on_policy", d) for d in seqs if "offline" not in d])
  np.testing.assert_allclose(m["pg/ratio_mean"], r_on.mean(), rtol=RTOL)


def test_sft_tokens_and_srft_weights():
  rng = np.random.default_rng(7)
  seqs = _random_seqs(rng, LENGTHS)
  seqs[0]["sft"] = np.ones(3)
  seqs[3]["sft"] = np.ones(5)
  logps, batch = _batch(seqs, LAYOUT)
  for weighting in ("none", "srft"):
    cfg = _cfg(token_weighting=weighting, sft_coef=0.7, loss_agg="token_mean")
    loss, m = pg.loss(logps, batch, cfg)
    per_seq = []
    for d in seqs:
      h = d["ent"].mean()
      if "sft" in d:
        w = 0.5 * np.exp(-h) if weighting == "srft" else 1.0
        per_seq.append(-0.7 * w * d["lp"])
      else:
        w = 0.1 * np.exp(h) if weighting == "srft" else 1.0
        per_seq.append(w * np_token_loss("ppo", np_ratio("on_policy", d), d["adv"], d["lp"]))
    np.testing.assert_allclose(loss, np_aggregate(per_seq, "token_mean", len(seqs)), rtol=RTOL,
                               err_msg=weighting)
    np.testing.assert_allclose(m["pg/sft_loss"] + m["pg/policy_loss"], loss, rtol=RTOL)


def test_adv_keep_mask_zeroes_the_policy_gradient_of_masked_tokens():
  rng = np.random.default_rng(8)
  seqs = _random_seqs(rng, [6])
  logps, batch = _batch(seqs, [[0]])
  keep = np.zeros((3, T), np.float32)
  keep[0, [2, 5, 6]] = 1                                  # tokens 0, 3, 4 of the sequence
  prefix = np.zeros((3, T), np.float32)
  prefix[0, 2:6] = 1                                      # tokens 0..3: a demonstration prefix
  batch = dict(batch, adv_keep_mask=keep, prefix_mask=prefix)
  g = _grad(logps, batch, _cfg(clip="none", loss_agg="token_mean"))[0, 2:8]
  r = np_ratio("on_policy", seqs[0])
  np.testing.assert_allclose(g, -r * seqs[0]["adv"] * keep[0, 2:8] / 6, rtol=RTOL, atol=ATOL)
  # prefix tokens (0..3) are not sampled: the gap metric covers tokens 4, 5 only.
  _, m = pg.loss(logps, batch, _cfg())
  gap = np.abs(seqs[0]["sampler"] - seqs[0]["old"])[4:]
  np.testing.assert_allclose(m["pg/logp_gap_mean"], gap.mean(), rtol=RTOL)


# ----------------------------------------------------------------------------- value loss

def test_value_loss_with_clipping():
  rng = np.random.default_rng(9)
  B, T_ = 2, 6
  mask = np.array([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]], np.float32)
  seq = np.array([[0] * 5 + [-1], [1] * 4 + [-1, -1]], np.int32)
  v, ret, old = (rng.normal(size=(B, T_)).astype(np.float32) for _ in range(3))
  batch = dict(loss_mask=mask, seq_index=seq, example_valid=np.ones(2, np.float32),
               returns=ret, old_values=old)
  cfg = _cfg(loss_agg="token_mean", vf_clip=0.2)
  loss, m = pg.value_loss(jnp.asarray(v), batch, cfg)
  vc = old + np.clip(v - old, -0.2, 0.2)
  per = 0.5 * np.maximum((v - ret) ** 2, (vc - ret) ** 2)
  np.testing.assert_allclose(loss, per[mask > 0].mean(), rtol=RTOL)
  np.testing.assert_allclose(m["vf/clip_frac"], ((vc - ret) ** 2 > (v - ret) ** 2)[mask > 0].mean())
  cfg.vf_clip = 0.0
  np.testing.assert_allclose(pg.value_loss(jnp.asarray(v), batch, cfg)[0],
                             (0.5 * (v - ret) ** 2)[mask > 0].mean(), rtol=RTOL)


# -------------------------------------------------------------------------- presets, jit, misc

def test_presets_follow_the_spec_and_run():
  p = pg.preset_config
  assert (p("grpo").kl, p("grpo").kl_beta, p("grpo").loss_agg) == ("k3", 0.04, "seq_mean_token_mean")
  assert (p("dapo").eps_high, p("dapo").loss_agg, p("dapo").kl_beta) == (0.28, "token_mean", 0.0)
  assert p("dapo").dynamic_sampling and p("dapo").overlong_buffer_frac > 0
  assert (p("dr_grpo").advantage, p("dr_grpo").loss_agg) == ("dr_grpo", "seq_mean_token_sum_norm")
  assert p("gspo").ratio == "sequence" and p("cispo").clip == "cispo"
  assert p("ppo").advantage == "gae" and p("ppo").kl_placement == "reward"
  assert (p("hpt").advantage, p("hpt").clip, p("hpt").hpt.gate) == ("dr_grpo", "none", 0)
  assert p("luffy").offline_shaping and p("luffy").offline_gamma == 0.1
  assert p("prefix_rft").loss_agg == "seq_mean_token_sum_norm"
  rng = np.random.default_rng(10)
  seqs = _random_seqs(rng, LENGTHS)
  logps, batch = _batch(seqs, LAYOUT)
  batch = dict(batch, returns=batch["advantages"], old_values=np.zeros_like(batch["advantages"]))
  for name in pg.PRESETS:
    cfg = p(name)
    cfg.max_completion_len = 9
    lg = dict(logps, values=jnp.zeros((3, T)))
    needs = pg.requirements(cfg)
    if not needs["needs_ref"]:
      lg.pop("ref")
    loss, _ = pg.loss(lg, batch, cfg)
    g = _grad(lg, batch, cfg)
    assert np.isfinite(loss) and np.all(np.isfinite(g)), name
    assert np.all(g[batch["loss_mask"] == 0] == 0), name


def test_preset_typo_fails_and_bad_choice_fails():
  with pytest.raises(ValueError):
    pg.preset_config("grpoo")
  with pytest.raises(ValueError, match="loss_agg"):
    pg.loss(*_batch([dict(lp=np.zeros(2))], [[0]]), _cfg(loss_agg="mean"))
  with pytest.raises(ValueError, match="max_completion_len"):
    pg.loss(*_batch([dict(lp=np.zeros(2))], [[0]]), _cfg(loss_agg="seq_mean_token_sum_norm"))
  logps, batch = _batch([dict(lp=np.zeros(2))], [[0]])
  logps.pop("ref")
  with pytest.raises(ValueError, match="ref"):
    pg.loss(logps, batch, _cfg(kl_beta=0.1))


def test_jit_equals_eager():
  rng = np.random.default_rng(11)
  seqs = _random_seqs(rng, LENGTHS)
  logps, batch = _batch(seqs, LAYOUT)
  cfg = _cfg(kl_beta=0.05, entropy_coef=0.01)
  eager = pg.loss(logps, batch, cfg)
  jitted = jax.jit(lambda lg, b: pg.loss(lg, b, cfg))(logps, batch)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=RTOL)
  for k in eager[1]:
    np.testing.assert_allclose(jitted[1][k], eager[1][k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_missing_old_logp_means_on_policy():
  rng = np.random.default_rng(12)
  seqs = _random_seqs(rng, LENGTHS)
  logps, batch = _batch(seqs, LAYOUT)
  batch.pop("old_logp")
  cfg = _cfg(loss_agg="token_mean")
  loss, m = pg.loss(logps, batch, cfg)
  a = np.concatenate([d["adv"] for d in seqs])
  np.testing.assert_allclose(loss, -a.mean(), rtol=RTOL, atol=ATOL)   # rho = 1 everywhere
  np.testing.assert_allclose(m["pg/ratio_mean"], 1.0, rtol=RTOL)
  g = _token_grads(seqs, LAYOUT, _grad(logps, batch, cfg))
  for i, d in enumerate(seqs):
    np.testing.assert_allclose(g[i], -d["adv"] / sum(LENGTHS), rtol=RTOL, atol=ATOL)
