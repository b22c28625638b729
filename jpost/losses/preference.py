"""Pairwise preference objectives (ALGORITHMS.md §2): the DPO family, SimPO, ORPO, and the
Bradley-Terry reward-model loss.

Pairs are interleaved in the batch: example 2p is the chosen (y_w), 2p+1 the rejected (y_l)
completion of pair p, packed or not (sequence sums are segment-aware). A pair counts only when both
of its slots are valid; the loss and every metric are sums over valid pairs divided by
`denom_examples` (the pair count of the whole accumulated batch), hence additive over micro-batches.

Per pair, with S(y) the sum of the loss-token log-probs and |y| the loss-token count:
  dw = S_theta(y_w) - S_ref(y_w),  dl = S_theta(y_l) - S_ref(y_l),  d = dw - dl;
length-normalised losses (dpo_norm, ipo) replace every S by S / |y|. The reference comes from
`logps['ref']` [B, T] (summed here) or `logps['ref_seq']` [S] (precomputed once over the dataset);
the two give the same loss.

Metrics (all pairwise losses): `rewards/chosen` = mean beta * dw, `rewards/rejected` =
mean beta * dl, `rewards/margin` = their difference, `rewards/accuracy` = mean(d > 0),
`logps/chosen` and `logps/rejected` = mean S_theta (unnormalised). The rewards use the dw, dl the loss itself uses:
  - dpo_norm, ipo: the length-normalised dw, dl (as TRL's IPO and open-instruct's dpo_norm);
  - simpo, orpo (reference-free): TRL's CPO/ORPO definition, beta (ORPO: lambda, which TRL calls
    beta) times the *average* policy log-prob S_theta(y) / |y|, so accuracy = mean(lpw > lpl).
Reward model (`rm_bt`): `rm_accuracy` = mean(r_w > r_l), `rm_margin` = mean(r_w - r_l),
`rm_chosen`, `rm_rejected` (mean r_w, r_l); held out they read `eval/rm_accuracy`, ...
"""
import jax
import jax.numpy as jnp
import ml_collections

from jpost.losses import common

logsig = jax.nn.log_sigmoid

_DEFAULTS = {
    "sigmoid": dict(beta=0.1, label_smoothing=0.0),
    "dpo_norm": dict(beta=5.0, label_smoothing=0.0),     # Tulu 3's length-normalised DPO recipe
    "ipo": dict(beta=0.1),
    "hinge": dict(beta=0.1),
    # The spec gives eps no default for robust DPO; TRL's (shared label_smoothing) is 0, where
    # robust equals sigmoid. rDPO's experiments use 0.1-0.4: set it to the estimated label-flip
    # rate.
    "robust": dict(beta=0.1, label_smoothing=0.0),
    "bco_pair": dict(beta=0.1),
    "simpo": dict(beta=2.0, gamma=0.5),
    "orpo": dict(lam=0.1),        # ALGORITHMS.md's lambda (TRL's ORPOConfig.beta)
    # c: weight of mean((r_w + r_l)^2) (TRL's center_rewards_coefficient).
    "rm_bt": dict(center_coef=0.0),
}


def default_config(name: str = "sigmoid") -> ml_collections.ConfigDict:
  """ALGORITHMS.md §2 defaults for loss `name`; only the keys that loss reads, so a misplaced
  override (e.g. label_smoothing for ipo) fails under a locked config instead of being ignored."""
  if name not in _DEFAULTS:
    raise ValueError(f"unknown preference loss {name!r}; known: {sorted(_DEFAULTS)}")
  return ml_collections.ConfigDict(_DEFAULTS[name])


# ---------------------------------------------------------------------------------- per-pair parts

def _policy_sums(logps, batch):
  return common.sequence_sums(logps["policy"], batch)


def _lengths(batch):
  return jnp.maximum(common.sequence_lengths(batch), 1.0)   # padding slots have |y| = 0


def log_ratios(logps, batch, *, normalize=False):
  """(dw [P], dl [P]): policy minus reference sequence log-probs, optionally divided by |y|."""
  delta_S = _policy_sums(logps, batch) - common.ref_sequence_sums(logps, batch)
  if normalize:
    delta_S = delta_S / _lengths(batch)
  return common.pair_split(delta_S)


def avg_logps(logps, batch):
  """(lpw [P], lpl [P]): the average per-token policy log-prob S_theta(y) / |y|."""
  return common.pair_split(_policy_sums(logps, batch) / _lengths(batch))


def _finish(loss_P, reward_w, reward_l, d_P, logps, batch, extra=None):
  """Pair-mean of the loss and the shared metrics (module docstring)."""
  mean = lambda x: common.pair_mean(x, batch)
  s_w, s_l = common.pair_split(jax.lax.stop_gradient(_policy_sums(logps, batch)))
  reward_w, reward_l = jax.lax.stop_gradient(reward_w), jax.lax.stop_gradient(reward_l)
  metrics = {
      "rewards/chosen": mean(reward_w),
      "rewards/rejected": mean(reward_l),
      "rewards/margin": mean(reward_w - reward_l),
      "rewards/accuracy": mean((d_P > 0).astype(jnp.float32)),
      "logps/chosen": mean(s_w),
      "logps/rejected": mean(s_l),
  }
  metrics.update({k: mean(jax.lax.stop_gradient(v)) for k, v in (extra or {}).items()})
  return mean(loss_P), metrics


def _smoothed_sigmoid(z_P, eps):
  # Conservative DPO: the preference label is flipped with probability eps.
  return -(1.0 - eps) * logsig(z_P) - eps * logsig(-z_P)


# ----------------------------------------------------------------------------------------- losses

def sigmoid(logps, batch, cfg):
  """DPO: -(1-eps) logsig(beta d) - eps logsig(-beta d)."""
  dw, dl = log_ratios(logps, batch)
  d = dw - dl
  loss = _smoothed_sigmoid(cfg.beta * d, cfg.label_smoothing)
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, d, logps, batch)


def dpo_norm(logps, batch, cfg):
  """Tulu 3's length-normalised DPO: the sigmoid loss on dw / |y_w|, dl / |y_l|."""
  dw, dl = log_ratios(logps, batch, normalize=True)
  d = dw - dl
  loss = _smoothed_sigmoid(cfg.beta * d, cfg.label_smoothing)
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, d, logps, batch)


def ipo(logps, batch, cfg):
  """IPO: (dw/|y_w| - dl/|y_l| - 1/(2 beta))^2."""
  dw, dl = log_ratios(logps, batch, normalize=True)
  d = dw - dl
  loss = jnp.square(d - 1.0 / (2.0 * cfg.beta))
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, d, logps, batch)


def hinge(logps, batch, cfg):
  """SLiC hinge: relu(1 - beta d)."""
  dw, dl = log_ratios(logps, batch)
  d = dw - dl
  loss = jax.nn.relu(1.0 - cfg.beta * d)
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, d, logps, batch)


def robust(logps, batch, cfg):
  """Robust DPO: (-(1-eps) logsig(beta d) + eps logsig(-beta d)) / (1 - 2 eps), eps in [0, 0.5)."""
  eps = cfg.label_smoothing
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"robust: label_smoothing={eps} must be in [0, 0.5)")
  dw, dl = log_ratios(logps, batch)
  d = dw - dl
  z = cfg.beta * d
  loss = (-(1.0 - eps) * logsig(z) + eps * logsig(-z)) / (1.0 - 2.0 * eps)
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, d, logps, batch)


def bco_pair(logps, batch, cfg):
  """Pairwise BCO: -logsig(beta dw) - logsig(-beta dl).

  As in ALGORITHMS.md: no reward shift (TRL's bco_pair also subtracts a running mean of the
  rewards; the unpaired `bco` objective carries that state).
  """
  dw, dl = log_ratios(logps, batch)
  loss = -logsig(cfg.beta * dw) - logsig(-cfg.beta * dl)
  return _finish(loss, cfg.beta * dw, cfg.beta * dl, dw - dl, logps, batch)


def simpo(logps, batch, cfg):
  """SimPO (reference-free): -logsig(beta (lpw - lpl) - gamma), lp = average log-prob."""
  lpw, lpl = avg_logps(logps, batch)
  loss = -logsig(cfg.beta * (lpw - lpl) - cfg.gamma)
  return _finish(loss, cfg.beta * lpw, cfg.beta * lpl, lpw - lpl, logps, batch)


def orpo(logps, batch, cfg):
  """ORPO (reference-free): -lpw + lambda * -logsig(log_odds).

  log_odds = log(odds(y_w) / odds(y_l)) with odds(y) = p / (1 - p), p = exp(lp) the average
  per-token probability; log(1 - p) goes through a cancellation-free log1mexp.
  """
  lpw, lpl = avg_logps(logps, batch)
  log_odds = (lpw - lpl) - (common.log1mexp(lpw) - common.log1mexp(lpl))
  ratio_loss = -logsig(log_odds)
  loss = -lpw + cfg.lam * ratio_loss
  extra = {"orpo/nll": -lpw, "orpo/log_odds": log_odds, "orpo/ratio_loss": ratio_loss}
  return _finish(loss, cfg.lam * lpw, cfg.lam * lpl, lpw - lpl, logps, batch, extra)


def rm_bt(logps, batch, cfg):
  """Bradley-Terry reward-model loss on the scalar head: -logsig(r_w - r_l - margin)
  + c * (r_w + r_l)^2, both averaged over pairs. `batch['margin']` [P] is optional (0 if absent).
  The centering term (c > 0) pins the reward scale's free offset near 0."""
  r_w, r_l = common.pair_split(logps["reward"])
  margin = batch["margin"] if "margin" in batch else 0.0
  loss = -logsig(r_w - r_l - margin) + cfg.center_coef * jnp.square(r_w + r_l)
  mean = lambda x: common.pair_mean(jax.lax.stop_gradient(x), batch)
  metrics = {
      "rm_accuracy": mean((r_w > r_l).astype(jnp.float32)),
      "rm_margin": mean(r_w - r_l),
      "rm_chosen": mean(r_w),
      "rm_rejected": mean(r_l),
  }
  return common.pair_mean(loss, batch), metrics


LOSSES = {"sigmoid": sigmoid, "dpo_norm": dpo_norm, "ipo": ipo, "hinge": hinge, "robust": robust,
          "bco_pair": bco_pair, "simpo": simpo, "orpo": orpo, "rm_bt": rm_bt}
