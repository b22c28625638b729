"""jpost.losses.preference against NumPy references written from ALGORITHMS.md §2.

Pairs are interleaved (example 2p chosen, 2p+1 rejected); pair 1 is a padding pair. Lengths are
ragged, prompts masked (with junk log-probs), and rows packed in several ways.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost.losses import preference as pref
from loss_batches import build, grad_on, off_token_mask, random_example

RTOL, ATOL = 1e-5, 1e-6
REF_LOSSES = ("sigmoid", "dpo_norm", "ipo", "hinge", "robust", "bco_pair")
FREE_LOSSES = ("simpo", "orpo")
LM_LOSSES = REF_LOSSES + FREE_LOSSES
LENGTHS = (3, 6, None, None, 1, 4, 5, 2)     # pair 1 is padding
LAYOUTS = {
    "unpacked": None,
    "packed": [[0, 1, 4], [5, 6, 7]],
    "split_pairs": [[1, 6], [0], [7, 4], [5]],   # chosen and rejected of a pair in different rows
}


def _examples(seed=0, scale=0.5):
  rng = np.random.default_rng(seed)
  return [None if n is None else random_example(rng, n, scale=scale) for n in LENGTHS]


def _cfg(name, **kw):
  c = pref.default_config(name)
  c.update(kw)
  return c


# ----------------------------------------------------------------------------- NumPy references

def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_log1mexp(x):
  # float64: accurate to ~1e-16 absolute, far below the tolerances for the x > -60 used here.
  return np.log(-np.expm1(x))


def np_pairwise(name, examples, cfg):
  """Loss and metrics of one pairwise loss, straight from the formulas (float64)."""
  losses, rw, rl, ds, sw, sl, extra = [], [], [], [], [], [], {}
  for p in range(len(examples) // 2):
    w, l = examples[2 * p], examples[2 * p + 1]
    if w is None:
      continue
    Sw, Sl = np.sum(w["lp"], dtype=np.float64), np.sum(l["lp"], dtype=np.float64)
    Rw, Rl = np.sum(w["ref"], dtype=np.float64), np.sum(l["ref"], dtype=np.float64)
    nw, nl = len(w["lp"]), len(l["lp"])
    dw, dl = Sw - Rw, Sl - Rl
    beta = cfg.get("beta")
    if name in ("dpo_norm", "ipo"):
      dw, dl = dw / nw, dl / nl
    d = dw - dl
    eps = cfg.get("label_smoothing", 0.0)
    if name in ("sigmoid", "dpo_norm"):
      L = -(1 - eps) * np_logsig(beta * d) - eps * np_logsig(-beta * d)
    elif name == "ipo":
      L = (dw - dl - 1 / (2 * beta)) ** 2
    elif name == "hinge":
      L = max(0.0, 1 - beta * d)
    elif name == "robust":
      L = (-(1 - eps) * np_logsig(beta * d) + eps * np_logsig(-beta * d)) / (1 - 2 * eps)
    elif name == "bco_pair":
      L = -np_logsig(beta * dw) - np_logsig(-beta * dl)
    elif name in ("simpo", "orpo"):
      lpw, lpl = Sw / nw, Sl / nl
      d = lpw - lpl
      if name == "simpo":
        L = -np_logsig(beta * (lpw - lpl) - cfg.gamma)
        dw, dl = lpw, lpl                    # TRL CPO: rewards = beta * average log-prob
      else:
        log_odds = (lpw - lpl) - (np_log1mexp(lpw) - np_log1mexp(lpl))
        L = -lpw + cfg.lam * -np_logsig(log_odds)
        beta, dw, dl = cfg.lam, lpw, lpl     # TRL ORPO: rewards = lambda * average log-prob
        for k, v in (("orpo/nll", -lpw), ("orpo/log_odds", log_odds),
                     ("orpo/ratio_loss", -np_logsig(log_odds))):
          extra.setdefault(k, []).append(v)
    losses.append(L)
    rw.append(beta * dw)
    rl.append(beta * dl)
    ds.append(d)
    sw.append(Sw)
    sl.append(Sl)
  metrics = {"rewards/chosen": np.mean(rw), "rewards/rejected": np.mean(rl),
             "rewards/margin": np.mean(np.subtract(rw, rl)),
             "rewards/accuracy": np.mean(np.greater(ds, 0)),
             "logps/chosen": np.mean(sw), "logps/rejected": np.mean(sl)}
  metrics.update({k: np.mean(v) for k, v in extra.items()})
  return np.mean(losses), metrics


def _check(loss, metrics, expected_loss, expected_metrics):
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(expected_metrics)
  for k, v in expected_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=RTOL, atol=ATOL, err_msg=k)


# ----------------------------------------------------------------------------------------- tests

def test_defaults():
  assert pref.default_config("sigmoid").beta == 0.1
  assert pref.default_config("sigmoid").label_smoothing == 0.0
  assert pref.default_config("dpo_norm").beta == 5.0
  assert pref.default_config("simpo").beta == 2.0 and pref.default_config("simpo").gamma == 0.5
  assert pref.default_config("orpo").lam == 0.1
  assert pref.default_config("rm_bt").center_coef == 0.0
  assert "label_smoothing" not in pref.default_config("ipo")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", LM_LOSSES)
def test_matches_numpy(name, layout):
  ex = _examples()
  cfg = _cfg(name)
  logps, batch, _ = build(ex, LAYOUTS[layout])
  loss, metrics = pref.LOSSES[name](logps, batch, cfg)
  _check(loss, metrics, *np_pairwise(name, ex, cfg))


@pytest.mark.parametrize("name,eps", [("sigmoid", 0.3), ("dpo_norm", 0.1), ("robust", 0.2),
                                      ("robust", 0.45)])
def test_label_smoothing(name, eps):
  ex = _examples(1, scale=2.0)
  cfg = _cfg(name, label_smoothing=eps)
  logps, batch, _ = build(ex, LAYOUTS["packed"])
  loss, metrics = pref.LOSSES[name](logps, batch, cfg)
  _check(loss, metrics, *np_pairwise(name, ex, cfg))
  unsmoothed, _ = pref.LOSSES[name](logps, batch, _cfg(name, label_smoothing=0.0))
  assert abs(float(loss) - float(unsmoothed)) > 1e-3      # eps is really used


def test_robust_rejects_eps_of_one_half():
  logps, batch, _ = build(_examples())
  with pytest.raises(ValueError, match="0.5"):
    pref.robust(logps, batch, _cfg("robust", label_smoothing=0.5))


@pytest.mark.parametrize("name", REF_LOSSES)
def test_precomputed_reference_equals_token_reference(name):
  ex = _examples(2)
  cfg = _cfg(name)
  la, ma = pref.LOSSES[name](*build(ex, LAYOUTS["packed"])[:2], cfg)
  logps, batch, _ = build(ex, LAYOUTS["packed"], ref_seq=True)
  assert "ref" not in logps
  # A padding slot of a precomputed table may hold anything: it must not leak.
  logps["ref_seq"] = logps["ref_seq"].at[2].set(jnp.nan).at[3].set(1e30)
  lb, mb = pref.LOSSES[name](logps, batch, cfg)
  _check(lb, mb, la, ma)


@pytest.mark.parametrize("name", FREE_LOSSES)
def test_reference_free_losses_ignore_ref(name):
  ex = _examples(3)
  cfg = _cfg(name)
  logps, batch, _ = build(ex, LAYOUTS["split_pairs"])
  la, ma = pref.LOSSES[name]({"policy": logps["policy"]}, batch, cfg)
  junk = dict(logps, ref=logps["ref"] * 3.0 + 1.0)
  lb, mb = pref.LOSSES[name](junk, batch, cfg)
  _check(lb, mb, la, ma)


def test_losses_with_ref_fail_clearly_without_it():
  logps, batch, _ = build(_examples())
  with pytest.raises(KeyError, match="needs_ref"):
    pref.sigmoid({"policy": logps["policy"]}, batch, _cfg("sigmoid"))


def _denoms(ex):
  pairs = sum(ex[2 * p] is not None for p in range(len(ex) // 2))
  tokens = sum(len(e["lp"]) for e in ex if e is not None)
  return {"denom_examples": np.float32(pairs), "denom_tokens": np.float32(tokens)}


@pytest.mark.parametrize("name", LM_LOSSES)
def test_additive_over_micro_batches(name):
  ex = _examples(4)
  cfg = _cfg(name)
  full, full_m = pref.LOSSES[name](*build(ex, LAYOUTS["packed"])[:2], cfg)
  total, totals = 0.0, {}
  for half in (ex[:4], ex[4:]):
    logps, batch, _ = build(half)
    loss, m = pref.LOSSES[name](logps, dict(batch, **_denoms(ex)), cfg)
    total += loss
    for k, v in m.items():
      totals[k] = totals.get(k, 0.0) + v
  _check(total, totals, full, full_m)


@pytest.mark.parametrize("name", LM_LOSSES + ("rm_bt",))
def test_jit_equals_no_jit(name):
  logps, batch, _ = build(_examples(5), LAYOUTS["packed"])
  logps["reward"] = jnp.linspace(-1.0, 2.0, 8)
  cfg = _cfg(name)
  fn = lambda l, b: pref.LOSSES[name](l, b, cfg)
  (a, ma), (b, mb) = jax.jit(fn)(logps, batch), fn(logps, batch)
  _check(a, ma, b, mb)


@pytest.mark.parametrize("name", LM_LOSSES)
def test_gradient_signs(name, layout="split_pairs"):
  """Raising S_theta(y_w) lowers the loss, raising S_theta(y_l) raises it; nothing else moves.
  (Packed rows with a pair split across rows: the layout where a gather/scatter bug shows.)"""
  ex = _examples(6)
  cfg = _cfg(name)
  if name == "hinge":    # relu(1 - beta d) has zero gradient once beta d > 1: stay below
    assert all(cfg.beta * (ex[i]["lp"].sum() - ex[i]["ref"].sum()
                           - ex[i + 1]["lp"].sum() + ex[i + 1]["ref"].sum()) < 1 for i in (0, 4, 6))
  logps, batch, where = build(ex, LAYOUTS[layout])
  g = jax.grad(lambda l: pref.LOSSES[name](l, batch, cfg)[0])(logps)["policy"]
  for p in (0, 2, 3):
    assert np.all(grad_on(where, g, 2 * p) < 0), (name, p, grad_on(where, g, 2 * p))
    assert np.all(grad_on(where, g, 2 * p + 1) > 0), (name, p, grad_on(where, g, 2 * p + 1))
  assert np.all(np.asarray(g)[off_token_mask(where)] == 0)


def test_gradient_magnitude_dpo():
  """d loss / d lp_t on a chosen token = -beta sigma(-beta d) / P exactly (every token of y_w)."""
  ex = _examples(7)
  logps, batch, where = build(ex, LAYOUTS["packed"])
  g = jax.grad(lambda l: pref.sigmoid(l, batch, _cfg("sigmoid"))[0])(logps)
  for p in (0, 2, 3):
    w, l = ex[2 * p], ex[2 * p + 1]
    d = (w["lp"].sum() - w["ref"].sum()) - (l["lp"].sum() - l["ref"].sum())
    expected = -0.1 / (1 + np.exp(0.1 * d)) / 3
    np.testing.assert_allclose(grad_on(where, g["policy"], 2 * p), expected, rtol=1e-5)
    np.testing.assert_allclose(grad_on(where, g["policy"], 2 * p + 1), -expected, rtol=1e-5)
    # The reference is a constant of the loss only through logps: its gradient mirrors policy's.
    np.testing.assert_allclose(grad_on(where, g["ref"], 2 * p), -expected, rtol=1e-5)


def test_orpo_finite_when_log_probs_round_to_zero():
  """lp = 0 (probability 1 in float32) must give a finite loss and gradient, not nan."""
  ex = [{"lp": np.zeros(3), "ref": np.zeros(3)}, {"lp": np.full(2, -1e-9), "ref": np.zeros(2)},
        {"lp": np.full(4, -1e-4), "ref": np.zeros(4)},
        {"lp": np.full(2, -50.0), "ref": np.zeros(2)}]
  logps, batch, _ = build(ex)
  cfg = _cfg("orpo")
  loss, _ = pref.orpo(logps, batch, cfg)
  g = jax.grad(lambda l: pref.orpo(l, batch, cfg)[0])(logps)["policy"]
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g)))
  # The well-conditioned pair (lpw = -1e-4 vs lpl = -50) still matches the float64 formula.
  full, _ = np_pairwise("orpo", [None, None] + ex[2:], cfg)
  one, _ = pref.orpo(*build([None, None] + ex[2:])[:2], cfg)
  np.testing.assert_allclose(one, full, rtol=1e-5)


# --------------------------------------------------------------------------------- reward model

def np_rm(rewards, valid_pairs, margin, c):
  losses, acc, marg = [], [], []
  for p in valid_pairs:
    rw, rl = rewards[2 * p], rewards[2 * p + 1]
    losses.append(-np_logsig(rw - rl - margin[p]) + c * (rw + rl) ** 2)
    acc.append(rw > rl)
    marg.append(rw - rl)
  return np.mean(losses), {"rm_accuracy": np.mean(acc), "rm_margin": np.mean(marg),
                           "rm_chosen": np.mean([rewards[2 * p] for p in valid_pairs]),
                           "rm_rejected": np.mean([rewards[2 * p + 1] for p in valid_pairs])}


@pytest.mark.parametrize("with_margin", (False, True))
@pytest.mark.parametrize("c", (0.0, 0.01))
def test_reward_model_bradley_terry(with_margin, c):
  _, batch, _ = build(_examples(), LAYOUTS["packed"])
  rewards = np.array([1.5, -0.5, 9.0, 9.0, -0.2, 0.3, 2.0, 1.0], np.float32)
  margin = np.array([0.5, 3.0, 0.0, 1.25], np.float32) if with_margin else np.zeros(4, np.float32)
  if with_margin:
    batch["margin"] = margin
  cfg = _cfg("rm_bt", center_coef=c)
  loss, metrics = pref.rm_bt({"reward": jnp.asarray(rewards)}, batch, cfg)
  _check(loss, metrics, *np_rm(rewards.astype(np.float64), (0, 2, 3), margin, c))
  g = jax.grad(lambda r: pref.rm_bt({"reward": r}, batch, _cfg("rm_bt"))[0])(jnp.asarray(rewards))
  assert np.all(np.asarray(g)[[0, 4, 6]] < 0) and np.all(np.asarray(g)[[1, 5, 7]] > 0)
  assert np.all(np.asarray(g)[[2, 3]] == 0)           # padding pair
  # Additivity: halves with the global pair count.
  total, totals = 0.0, {}
  for lo in (0, 4):
    half = dict(example_valid=batch["example_valid"][lo:lo + 4], denom_examples=np.float32(3))
    if with_margin:
      half["margin"] = margin[lo // 2:lo // 2 + 2]
    l, m = pref.rm_bt({"reward": jnp.asarray(rewards[lo:lo + 4])}, half, cfg)
    total += l
    totals = {k: totals.get(k, 0.0) + v for k, v in m.items()}
  _check(total, totals, loss, metrics)
