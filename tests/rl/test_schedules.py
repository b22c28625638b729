"""Demonstration mixing helpers (ALGORITHMS.md §5)."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jpost.rl import schedules as S


@pytest.mark.parametrize("gate", [0, 2])
def test_hpt_switches_exactly_at_the_gate(gate):
  n = 8
  correct = np.zeros((n + 1, n), bool)
  for k in range(n + 1):
    correct[k, :k] = True                       # prompt k has exactly k correct rollouts
  use_sft, stats = S.hpt_gate(correct, gate)
  np.testing.assert_array_equal(use_sft, np.arange(n + 1) <= gate)
  assert use_sft[gate] and not use_sft[gate + 1]
  assert stats["hpt/sft_frac"] == (gate + 1) / (n + 1)


def test_luffy_group_contains_the_demonstration():
  G, T = 4, 6
  rng = np.random.default_rng(0)
  group = dict(tokens=rng.integers(1, 50, (G, T)), loss_mask=np.ones((G, T), np.float32),
               old_logp=rng.normal(size=(G, T)).astype(np.float32),
               sampler_logp=rng.normal(size=(G, T)).astype(np.float32),
               rewards=np.array([0.0, 1.0, 0.0, 0.0], np.float32))
  demo = dict(tokens=np.arange(100, 106), loss_mask=np.array([0, 1, 1, 1, 1, 0], np.float32),
              rewards=np.float32(1.0))
  mixed = S.luffy_mix(group, demo)
  np.testing.assert_array_equal(mixed["tokens"][-1], demo["tokens"])
  np.testing.assert_array_equal(mixed["tokens"][:-1], group["tokens"][:-1])
  np.testing.assert_array_equal(mixed["offline_mask"][-1], demo["loss_mask"])
  assert np.all(mixed["offline_mask"][:-1] == 0)
  assert np.all(mixed["old_logp"][-1] == 0) and np.all(mixed["sampler_logp"][-1] == 0)
  np.testing.assert_array_equal(mixed["rewards"], [0.0, 1.0, 0.0, 1.0])
  assert group["tokens"][-1][0] != 100                      # the input group is not modified
  with pytest.raises(ValueError, match="not in the group"):
    S.luffy_mix(group, dict(demo, extra=np.zeros(T)))


def test_cosine_schedule_endpoints():
  assert S.cosine_decay(0, 100) == pytest.approx(0.95)
  assert S.cosine_decay(50, 100) == pytest.approx(0.5)
  assert S.cosine_decay(100, 100) == pytest.approx(0.05)
  assert S.cosine_decay(250, 100) == pytest.approx(0.05)     # held after the end
  values = [S.cosine_decay(s, 100) for s in range(101)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_prefix_lengths_leave_at_least_one_token():
  rng = np.random.default_rng(0)
  lengths = np.array([1, 2, 5, 40, 300])
  for low in (0.95, 0.5, 0.05):
    k = S.sample_prefix_lengths(rng, lengths, low, 0.95, num=200)
    assert k.shape == (5, 200)
    assert np.all(k >= 0) and np.all(k <= lengths[:, None] - 1)
    assert np.all(k[0] == 0)                                  # a 1-token demonstration: no prefix
    assert np.all(k >= np.floor(low * lengths[:, None]) - 1)  # u >= low
    assert np.all(k <= np.floor(0.95 * lengths[:, None]))     # u <= high
  with pytest.raises(ValueError):
    S.sample_prefix_lengths(rng, [3, 0], 0.5, 0.9)


def test_entropy_clipping_keeps_the_top_20_percent_of_prefix_tokens():
  rng = np.random.default_rng(1)
  T = 16
  entropy = rng.uniform(0, 3, (2, T))
  prefix = np.zeros((2, T), np.float32)
  prefix[0, 2:12] = 1                     # 10 prefix tokens -> keep 2
  prefix[1, 3:6] = 1                      # 3 prefix tokens -> keep ceil(0.6) = 1
  keep = S.entropy_keep_mask(entropy, prefix, top_frac=0.2)
  for b, k in ((0, 2), (1, 1)):
    idx = np.flatnonzero(prefix[b])
    kept = idx[keep[b, idx] == 1]
    assert len(kept) == k
    assert entropy[b, kept].min() >= entropy[b, idx[keep[b, idx] == 0]].max()  # the highest ones
    assert np.all(keep[b, prefix[b] == 0] == 1)                  # generated tokens untouched


def test_instance_filter():
  correct = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1]], bool)
  keep, stats = S.instance_filter(correct)
  np.testing.assert_array_equal(keep, [False, True, True])
  keep, stats = S.instance_filter(correct, drop_all_correct=True)
  np.testing.assert_array_equal(keep, [False, True, False])
  assert stats["filter/kept_frac"] == pytest.approx(1 / 3)


def test_srft_weights():
  # Two sequences in one packed row and one in another; entropies averaged per sequence.
  seq = np.array([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]], np.int32)
  mask = np.array([[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]], np.float32)
  ent = np.array([[9, 0.5, 1.5, 9, 2.0, 9], [9, 0.3, 0.6, 0.9, 9, 9]], np.float32)
  sft = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
  batch = dict(loss_mask=mask, seq_index=seq, example_valid=np.ones(3, np.float32))
  w_sft, w_pg = S.srft_weights(jnp.asarray(ent), batch, jnp.asarray(sft))
  h = [1.0, 2.0, 0.6]                      # token means over each sequence's loss tokens
  np.testing.assert_allclose(w_sft[0, 1:3], 0.5 * math.exp(-h[0]), rtol=1e-6)
  np.testing.assert_allclose(w_pg[0, 4], 0.1 * math.exp(h[1]), rtol=1e-6)
  np.testing.assert_allclose(w_pg[1, 1:4], 0.1 * math.exp(h[2]), rtol=1e-6)
  assert float(w_pg[0, 1]) == 0.0 and float(w_sft[1, 1]) == 0.0
