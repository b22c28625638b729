"""jpost.losses.sft against NumPy references written from ALGORITHMS.md §1."""
import jax
import numpy as np
import pytest

from jpost.losses import sft
from loss_batches import build, grad_on, off_token_mask, random_example

RTOL, ATOL = 1e-5, 1e-6
NAMES = ("nll", "dft", "asft", "sft_kl")
REDUCTIONS = ("token_mean", "sequence_mean", "sum")


def _examples(seed=0):
  rng = np.random.default_rng(seed)
  ex = [random_example(rng, n, with_ref=False, with_kl=True) for n in (3, 7, 1, 5, 4)]
  return ex[:2] + [None] + ex[2:]          # a padding slot between valid examples


PACKED = [[0, 1], [3, 4, 5]]               # two and three examples per row


# ----------------------------------------------------------------------------- NumPy references

def ref_token_loss(name, e, lam):
  lp = np.asarray(e["lp"], np.float64)
  kl = np.asarray(e["kl"], np.float64)
  p = np.exp(lp)
  return {"nll": -lp, "dft": -p * lp, "asft": -p * lp + lam * kl, "sft_kl": -lp + lam * kl}[name]


def ref_loss(name, examples, reduction, lam=0.05):
  per = [ref_token_loss(name, e, lam) for e in examples if e is not None]
  if reduction == "token_mean":
    return np.sum(np.concatenate(per)) / sum(len(x) for x in per)
  if reduction == "sequence_mean":
    return np.mean([x.mean() for x in per])
  return np.sum(np.concatenate(per))


def _cfg(name, **kw):
  c = sft.default_config(name)
  c.update(kw)
  return c


# ----------------------------------------------------------------------------------------- tests

def test_defaults():
  assert sft.default_config("nll").reduction == "token_mean"
  assert sft.default_config("asft").kl_coef == 0.05
  assert sft.default_config("sft_kl").kl_coef == 0.05
  assert "kl_coef" not in sft.default_config("dft")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy_packed_and_unpacked(name, reduction):
  ex = _examples()
  expected = ref_loss(name, ex, reduction)
  cfg = _cfg(name, reduction=reduction)
  for layout in (None, PACKED):
    logps, batch, _ = build(ex, layout)
    loss, metrics = sft.LOSSES[name](logps, batch, cfg)
    np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
    all_lp = np.concatenate([e["lp"] for e in ex if e is not None])
    np.testing.assert_allclose(metrics["sft/nll"], -all_lp.mean(), rtol=RTOL)
    assert metrics["sft/tokens"] == len(all_lp)
    if name in ("asft", "sft_kl"):
      all_kl = np.concatenate([e["kl"] for e in ex if e is not None])
      np.testing.assert_allclose(metrics["sft/kl"], all_kl.mean(), rtol=RTOL)


@pytest.mark.parametrize("name", NAMES)
def test_kl_coef_is_used(name):
  ex = _examples(1)
  logps, batch, _ = build(ex, PACKED)
  cfg = _cfg(name, **({"kl_coef": 0.7} if name in ("asft", "sft_kl") else {}))
  loss, _ = sft.LOSSES[name](logps, batch, cfg)
  np.testing.assert_allclose(loss, ref_loss(name, ex, "token_mean", lam=0.7), rtol=RTOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_additive_over_micro_batches(name, reduction):
  ex = _examples(2)
  cfg = _cfg(name, reduction=reduction)
  logps, batch, _ = build(ex, PACKED)
  full_loss, full_m = sft.LOSSES[name](logps, batch, cfg)
  valid = [e for e in ex if e is not None]
  denoms = {"denom_tokens": np.float32(sum(len(e["lp"]) for e in valid)),
            "denom_examples": np.float32(len(valid))}
  total, totals = 0.0, {}
  for half in (ex[:3], ex[3:]):
    logps_h, batch_h, _ = build(half)
    loss_h, m_h = sft.LOSSES[name](logps_h, dict(batch_h, **denoms), cfg)
    total += loss_h
    for k, v in m_h.items():
      totals[k] = totals.get(k, 0.0) + v
  np.testing.assert_allclose(total, full_loss, rtol=RTOL, atol=ATOL)
  for k in full_m:
    np.testing.assert_allclose(totals[k], full_m[k], rtol=RTOL, atol=ATOL, err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_no_jit(name):
  logps, batch, _ = build(_examples(3), PACKED)
  cfg = _cfg(name)
  fn = lambda l, b: sft.LOSSES[name](l, b, cfg)
  a, ma = jax.jit(fn)(logps, batch)
  b, mb = fn(logps, batch)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradients(reduction):
  """d loss / d lp_t: nll -w_t; DFT -sg(p_t) w_t (the weight is not differentiated); KL term
  lambda w_t; w_t the reduction weight; 0 on prompt tokens, padding and other examples."""
  ex = _examples(4)
  logps, batch, where = build(ex, PACKED)
  valid = [i for i, e in enumerate(ex) if e is not None]
  n_tok = sum(len(ex[i]["lp"]) for i in valid)
  weight = {i: {"token_mean": 1.0 / n_tok, "sequence_mean": 1.0 / (len(ex[i]["lp"]) * len(valid)),
                "sum": 1.0}[reduction] for i in valid}
  for name in NAMES:
    cfg = _cfg(name, reduction=reduction)
    g = jax.grad(lambda l: sft.LOSSES[name](l, batch, cfg)[0])(logps)
    for i in valid:
      p = np.exp(ex[i]["lp"])
      expected_lp = {"nll": -1.0, "dft": -p, "asft": -p, "sft_kl": -1.0}[name] * weight[i]
      np.testing.assert_allclose(grad_on(where, g["policy"], i), expected_lp * np.ones_like(p),
                                 rtol=RTOL, err_msg=name)
      expected_kl = 0.05 * weight[i] if name in ("asft", "sft_kl") else 0.0
      np.testing.assert_allclose(grad_on(where, g["kl"], i), expected_kl, rtol=RTOL, err_msg=name)
    off = off_token_mask(where)
    assert np.all(np.asarray(g["policy"])[off] == 0) and np.all(np.asarray(g["kl"])[off] == 0)


def test_asft_needs_kl_and_unknown_reduction_fails():
  logps, batch, _ = build(_examples())
  with pytest.raises(KeyError, match="kl"):
    sft.asft({"policy": logps["policy"]}, batch, _cfg("asft"))
  with pytest.raises(ValueError, match="reduction"):
    sft.nll(logps, batch, _cfg("nll", reduction="mean"))


def test_sum_reduction_divides_by_nothing():
  """Tulu 3's `sum`: the plain sum of token NLLs, whatever denominators the step writes."""
  ex = _examples(5)
  logps, batch, _ = build(ex, PACKED)
  batch = dict(batch, denom_tokens=np.float32(1000.0), denom_examples=np.float32(77.0))
  loss, _ = sft.nll(logps, batch, _cfg("nll", reduction="sum"))
  np.testing.assert_allclose(loss, -sum(e["lp"].sum() for e in ex if e is not None), rtol=RTOL)
