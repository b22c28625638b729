"""jpost.rl.advantages against plain-Python references written from ALGORITHMS.md §4.3 and DAPO."""
import statistics

import numpy as np
import pytest

from jpost.rl import advantages as adv

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, -1.0, 0.5, 0.0], [0.1, 0.1, 0.1, 0.1]]


def _ref_group(rewards, estimator, scale="group", eps=1e-6):
  batch_std = statistics.stdev([x for g in rewards for x in g])
  out = []
  for g in rewards:
    mean = sum(g) / len(g)
    row = []
    for i, r in enumerate(g):
      if estimator == "grpo" and scale != "none":
        std = statistics.stdev(g) if scale == "group" else batch_std
        row.append((r - mean) / (std + eps))
      elif estimator in ("grpo", "dr_grpo"):
        row.append(r - mean)
      elif estimator == "rloo":
        others = g[:i] + g[i + 1:]
        row.append(r - sum(others) / len(others))
      else:
        row.append(r)
    if estimator != "reinforce" and len(set(g)) == 1:
      row = [0.0] * len(g)
    out.append(row)
  return np.array(out)


@pytest.mark.parametrize("estimator,scale", [("grpo", "group"), ("grpo", "batch"), ("grpo", "none"),
                                             ("dr_grpo", "group"), ("rloo", "group"),
                                             ("reinforce", "group")])
def test_group_estimators(estimator, scale):
  a, stats = adv.group_advantages(REWARDS, estimator, scale=scale)
  np.testing.assert_allclose(a, _ref_group(REWARDS, estimator, scale), rtol=1e-6, atol=1e-7)
  assert stats["pg/zero_adv_frac"] == 0.5                 # groups 1 and 3 are all-equal


def test_all_equal_groups_get_exactly_zero():
  # 0.1 * 3 / 3 != 0.1 in floating point: without the explicit rule A would be ~1e-11, not 0.
  rewards = [[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 1.0]]
  for estimator in ("grpo", "dr_grpo", "rloo"):
    a, stats = adv.group_advantages(rewards, estimator)
    assert np.all(a[:2] == 0.0), estimator
    assert np.all(a[2] != 0.0)
    np.testing.assert_allclose(stats["pg/zero_adv_frac"], 2 / 3)
  # REINFORCE has no baseline: G = 1 groups (plain REINFORCE) keep their reward.
  a, stats = adv.group_advantages([[3.0], [-1.0]], "reinforce")
  np.testing.assert_array_equal(a, [[3.0], [-1.0]])
  assert stats["pg/zero_adv_frac"] == 1.0
  a, _ = adv.group_advantages([[3.0, 0.0]], "reinforce", reinforce_pm1=True)
  np.testing.assert_array_equal(a, [[1.0, -1.0]])


def test_grpo_group_of_one_and_rloo_needs_two():
  a, _ = adv.group_advantages([[5.0], [2.0]], "grpo")
  np.testing.assert_array_equal(a, [[0.0], [0.0]])
  with pytest.raises(ValueError, match="rloo"):
    adv.group_advantages([[1.0], [0.0]], "rloo")


def _ref_gae(r, v, gamma, lam):
  """Textbook backward recursion on one episode (lists)."""
  out, next_v, next_a = [0.0] * len(r), 0.0, 0.0
  for t in reversed(range(len(r))):
    delta = r[t] + gamma * next_v - v[t]
    next_a = delta + gamma * lam * next_a
    out[t], next_v = next_a, v[t]
  return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_a_loop(gamma, lam):
  rng = np.random.default_rng(0)
  mask = np.zeros((3, 9), np.float32)
  mask[0, 2:7] = 1
  mask[1, 4:9] = 1                 # ends at the last column
  mask[2, [1, 2, 5, 6]] = 1        # not contiguous: the steps are the masked positions in order
  r = rng.normal(size=mask.shape).astype(np.float32)
  v = rng.normal(size=mask.shape).astype(np.float32)
  a, ret = adv.gae(r, v, mask, gamma, lam)
  for b in range(3):
    idx = np.flatnonzero(mask[b])
    want = _ref_gae(list(r[b, idx]), list(v[b, idx]), gamma, lam)
    np.testing.assert_allclose(a[b, idx], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret[b, idx], np.array(want) + v[b, idx], rtol=1e-5, atol=1e-6)
  assert np.all(a[mask == 0] == 0) and np.all(ret[mask == 0] == 0)
  if gamma == 1.0 and lam == 1.0:   # Monte Carlo: returns are the reward-to-go
    for b in range(3):
      idx = np.flatnonzero(mask[b])
      np.testing.assert_allclose(ret[b, idx], np.cumsum(r[b, idx][::-1])[::-1], rtol=1e-5)


def test_overlong_penalty_piecewise():
  lmax, buf = 100, 20
  lengths = [0, 50, 80, 81, 90, 99, 100, 101, 500]
  want = [0, 0, 0, -1 / 20, -10 / 20, -19 / 20, -1.0, -1.0, -1.0]
  np.testing.assert_allclose(adv.overlong_penalty(lengths, lmax, buf), want, rtol=1e-6)
  with pytest.raises(ValueError):
    adv.overlong_penalty(lengths, lmax, 0)


def test_dynamic_sampling_keeps_groups_with_variance():
  keep = adv.dynamic_sampling_keep([[1, 1, 1], [0, 1, 0], [0, 0, 0], [0.5, 0.5, 0.25]])
  np.testing.assert_array_equal(keep, [False, True, False, True])


def test_kl_in_reward_and_token_rewards():
  mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], np.float32)
  tok = adv.scores_to_token_rewards(np.array([2.0, -1.0]), mask)
  np.testing.assert_array_equal(tok, [[0, 0, 0, 2.0, 0], [0, 0, 0, 0, -1.0]])
  logp = np.full(mask.shape, -1.0, np.float32)
  ref = np.full(mask.shape, -1.5, np.float32)
  out = adv.kl_in_reward(tok, logp, ref, mask, beta=0.1)
  # r_t - beta (logp - ref) on loss tokens: -0.05 each, the score on the last one.
  np.testing.assert_allclose(out, tok - 0.05 * mask, rtol=1e-6)


def test_broadcast_to_tokens_and_whiten():
  seq = np.array([[0, 0, 0, -1], [1, 1, 2, 2]])
  mask = np.array([[0, 1, 1, 0], [0, 1, 0, 1]], np.float32)
  out = adv.broadcast_to_tokens(np.array([1.5, -2.0, 3.0]), seq, mask)
  np.testing.assert_array_equal(out, [[0, 1.5, 1.5, 0], [0, -2.0, 0, 3.0]])
  w = adv.masked_whiten(np.array([[9, 1.0, 2.0, 9], [9, 3.0, 9, 4.0]]), mask)
  np.testing.assert_allclose(w[mask > 0].mean(), 0.0, atol=1e-6)
  np.testing.assert_allclose(w[mask > 0].std(), 1.0, rtol=1e-5)
  assert np.all(w[mask == 0] == 0)
