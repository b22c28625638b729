"""Advantages, reward shaping and group filters (ALGORITHMS.md §4.3, DAPO), on the host in numpy.

Group estimators take rewards [P, G] (P prompts, G samples each, rows of a prompt contiguous) and
return advantages [P, G] plus a stats dict; `broadcast_to_tokens` turns per-sequence values into
the batch's `advantages` [B, T]. GAE works on per-token rewards of unpacked rollout rows [B, T]
(one completion per row, its tokens marked by the loss mask).
"""
import numpy as np

ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce")


def all_equal_groups(rewards_PG):
  """[P] bool: groups whose rewards are all identical (no learning signal relative to the group)."""
  rewards_PG = np.asarray(rewards_PG, np.float64)
  return np.all(rewards_PG == rewards_PG[:, :1], axis=1)


def group_advantages(rewards_PG, estimator="grpo", *, scale="group", eps=1e-6, ddof=1,
                     reinforce_pm1=False, batch_std=None):
  """Per-sample advantages from scalar rewards -> (adv [P, G] float32, stats).

  grpo: (r - mean_g) / (std + eps), std of the group (`scale='group'`), of the whole batch
        ('batch') or 1 ('none'); dr_grpo: r - mean_g; rloo: r - mean of the other G-1;
  reinforce: r (or +1 / -1 by the sign of r with `reinforce_pm1`).
  Baseline estimators give exactly 0 to all-equal groups (floating-point means need not cancel
  exactly). REINFORCE has no baseline, so its all-equal groups keep r: otherwise G = 1 (plain
  REINFORCE) would never learn. `pg/zero_adv_frac` is the fraction of all-equal groups.
  `batch_std` replaces the std of `rewards_PG` for scale='batch' when the batch is larger than
  these rows (its other prompts are on other processes).
  """
  r = np.asarray(rewards_PG, np.float64)
  if r.ndim != 2:
    raise ValueError(f"group_advantages: rewards must be [P, G], got shape {r.shape}")
  equal_P = all_equal_groups(r)
  mean_P1 = r.mean(axis=1, keepdims=True)
  if estimator in ("grpo", "dr_grpo"):
    adv = r - mean_P1
    if estimator == "grpo" and scale != "none":
      if scale == "group":
        std = r.std(axis=1, ddof=ddof, keepdims=True) if r.shape[1] > ddof else np.zeros_like(mean_P1)
      elif scale == "batch" and batch_std is not None:
        std = float(batch_std)
      elif scale == "batch":
        std = r.std(ddof=ddof) if r.size > ddof else 0.0
      else:
        raise ValueError(f"group_advantages: scale={scale!r}; expected group | batch | none")
      adv = adv / (std + eps)
  elif estimator == "rloo":
    g = r.shape[1]
    if g < 2:
      raise ValueError("group_advantages: rloo needs at least 2 samples per prompt")
    adv = r - (r.sum(axis=1, keepdims=True) - r) / (g - 1)
  elif estimator == "reinforce":
    adv = np.where(r > 0, 1.0, -1.0) if reinforce_pm1 else r.copy()
  else:
    raise ValueError(f"group_advantages: unknown estimator {estimator!r}; expected {ESTIMATORS}")
  if estimator != "reinforce":
    adv[equal_P] = 0.0
  stats = {
      "pg/zero_adv_frac": float(equal_P.mean()) if equal_P.size else 0.0,
      "pg/adv_mean": float(adv.mean()) if adv.size else 0.0,
      "pg/adv_std": float(adv.std()) if adv.size else 0.0,
      "rollout/reward_mean": float(r.mean()) if r.size else 0.0,
      "rollout/reward_std": float(r.std()) if r.size else 0.0,
  }
  return adv.astype(np.float32), stats


def broadcast_to_tokens(values_S, seq_index_BT, loss_mask_BT):
  """Per-sequence values [S] -> [B, T] on each sequence's loss tokens (0 elsewhere)."""
  values_S = np.asarray(values_S, np.float32).reshape(-1)
  seq = np.asarray(seq_index_BT)
  out = np.where(seq >= 0, values_S[np.maximum(seq, 0)], 0.0)
  return (out * np.asarray(loss_mask_BT)).astype(np.float32)


def gae(token_rewards_BT, values_BT, mask_BT, gamma=1.0, lam=0.95):
  """Generalised advantage estimation -> (advantages [B, T], returns [B, T]) float32.

  The time steps of row b are its loss-mask positions in order; the value after the last one is
  0 (the episode ends). delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1},
  returns = A + V. Positions outside the mask get 0.
  """
  r = np.asarray(token_rewards_BT, np.float64)
  v = np.asarray(values_BT, np.float64)
  m = np.asarray(mask_BT) > 0
  adv = np.zeros_like(r)
  next_v = np.zeros(r.shape[0])
  next_a = np.zeros(r.shape[0])
  for t in range(r.shape[1] - 1, -1, -1):   # vectorised over rows; T steps
    delta = r[:, t] + gamma * next_v - v[:, t]
    a = delta + gamma * lam * next_a
    adv[:, t] = np.where(m[:, t], a, 0.0)
    # Skipped (masked) positions carry the next step's value and advantage through unchanged.
    next_v = np.where(m[:, t], v[:, t], next_v)
    next_a = np.where(m[:, t], a, next_a)
  returns = np.where(m, adv + v, 0.0)
  return adv.astype(np.float32), returns.astype(np.float32)


def masked_whiten(x_BT, mask_BT, eps=1e-8, *, mean=None, std=None):
  """(x - mean) / std over the masked entries (PPO's optional advantage whitening); `mean` and
  `std` given when the batch spans processes (statistics of all their entries)."""
  x = np.asarray(x_BT, np.float64)
  m = np.asarray(mask_BT) > 0
  mean = x[m].mean() if mean is None else mean
  std = x[m].std() if std is None else std
  return np.where(m, (x - mean) / (std + eps), 0.0).astype(np.float32)


def scores_to_token_rewards(scores_B, mask_BT):
  """Sequence scores [B] -> per-token rewards [B, T]: the score on each row's last loss token."""
  m = np.asarray(mask_BT) > 0
  out = np.zeros(m.shape, np.float32)
  has = m.any(axis=1)
  last = m.shape[1] - 1 - np.argmax(m[:, ::-1], axis=1)
  out[np.flatnonzero(has), last[has]] = np.asarray(scores_B, np.float32)[has]
  return out


def kl_in_reward(token_rewards_BT, logp_BT, ref_logp_BT, mask_BT, beta):
  """KL placement 'reward' (PPO / Tulu 3): r_t - beta * k1_t, k1_t = logp_t - ref_t.

  `logp` is the sampling policy's log-prob (old_logp): the penalty is part of the reward, so it
  carries no gradient. Sum a row for a sequence-level reward.
  """
  k1 = np.asarray(logp_BT, np.float64) - np.asarray(ref_logp_BT, np.float64)
  m = np.asarray(mask_BT) > 0
  return np.where(m, np.asarray(token_rewards_BT) - beta * k1, 0.0).astype(np.float32)


def overlong_penalty(lengths, max_len, buffer, factor=1.0):
  """DAPO soft overlong punishment, added to the reward; per completion length L (tokens):
  0 if L <= max_len - buffer; ((max_len - buffer) - L) / buffer if inside the buffer; -1 beyond.
  """
  if not 0 < buffer <= max_len:
    raise ValueError(f"overlong_penalty: need 0 < buffer <= max_len, got {buffer}, {max_len}")
  length = np.asarray(lengths, np.float64)
  start = max_len - buffer
  p = np.where(length <= start, 0.0, (start - length) / buffer)
  p = np.where(length > max_len, -1.0, p)
  return (factor * p).astype(np.float32)


def dynamic_sampling_keep(rewards_PG):
  """DAPO dynamic sampling: keep [P] bool of groups with non-zero reward variance.

  The loop drops the others and samples more prompts until the batch is full.
  """
  return ~all_equal_groups(rewards_PG)
