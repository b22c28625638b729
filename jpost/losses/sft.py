"""Supervised fine-tuning objectives (ALGORITHMS.md §1): nll, dft, asft, sft_kl.

Each builds a per-token loss L_t on the loss tokens and reduces it with `cfg.reduction`:
  token_mean     sum_t m L / denom_tokens (loss tokens of the whole accumulated batch) [default]
  sequence_mean  mean over valid examples of (sum_t m L / |y|), over denom_examples
  sum            sum_t m L, divided by nothing (Tulu 3's `sum`): additive over micro-batches
                 and devices as is, so the update grows with the number of loss tokens per step,
                 which is why Tulu 3 pairs it with a small learning rate.
All three are additive over micro-batches, so gradient accumulation is exact.

logps: `policy` [B, T] always; `kl` [B, T] (full-vocabulary KL(p_ref || p_theta) per token, from
the fused primitive) for asft / sft_kl.
"""
import jax
import jax.numpy as jnp
import ml_collections

from jpost.losses import common

REDUCTIONS = ("token_mean", "sequence_mean", "sum")


def default_config(name: str = "nll") -> ml_collections.ConfigDict:
  """ALGORITHMS.md §1 defaults for objective `name` (only the keys that objective reads)."""
  if name not in ("nll", "dft", "asft", "sft_kl"):
    raise ValueError(f"unknown SFT objective {name!r}")
  c = ml_collections.ConfigDict()
  c.reduction = "token_mean"      # token_mean | sequence_mean | sum
  if name in ("asft", "sft_kl"):
    c.kl_coef = 0.05              # lambda: weight of the per-token KL(ref || theta)
  return c


def reduce(x_BT, batch, reduction):
  """Reduces a per-token loss over the loss tokens with global denominators (module docstring)."""
  if reduction == "token_mean":
    return common.token_mean(x_BT, batch)
  if reduction == "sequence_mean":
    lengths_S = jnp.maximum(common.sequence_lengths(batch), 1.0)   # padding slots have |y| = 0
    return common.example_mean(common.sequence_sums(x_BT, batch) / lengths_S, batch)
  if reduction == "sum":
    return jnp.sum(x_BT * batch["loss_mask"])
  raise ValueError(f"sft: reduction={reduction!r}; expected one of {REDUCTIONS}")


def _metrics(lp_BT, batch, kl_BT=None):
  m = {"sft/nll": common.token_mean(-lp_BT, batch),
       "sft/tokens": jnp.sum(batch["loss_mask"])}
  if kl_BT is not None:
    m["sft/kl"] = common.token_mean(kl_BT, batch)
  return m


def _kl(logps, name):
  if "kl" not in logps:
    raise KeyError(f"{name} needs logps['kl'] (full-vocabulary KL(ref || policy) per token); its "
                   "registry entry has needs_kl=True")
  return logps["kl"]


def nll(logps, batch, cfg):
  """Negative log-likelihood of the loss tokens."""
  lp_BT = logps["policy"]
  return reduce(-lp_BT, batch, cfg.reduction), _metrics(lp_BT, batch)


def _dft_token(lp_BT):
  # DFT rescales each token's NLL gradient by its own probability, which must not be
  # differentiated through: d/dlp of the term is -p, not -(p + p * lp).
  return -jax.lax.stop_gradient(jnp.exp(lp_BT)) * lp_BT


def dft(logps, batch, cfg):
  """Dynamic Fine-Tuning: per token -sg(exp(lp)) * lp."""
  lp_BT = logps["policy"]
  metrics = _metrics(lp_BT, batch)
  metrics["sft/prob"] = common.token_mean(jnp.exp(jax.lax.stop_gradient(lp_BT)), batch)
  return reduce(_dft_token(lp_BT), batch, cfg.reduction), metrics


def asft(logps, batch, cfg):
  """Anchored SFT: the DFT term + kl_coef * KL(p_ref || p_theta) per token."""
  lp_BT, kl_BT = logps["policy"], _kl(logps, "asft")
  metrics = _metrics(lp_BT, batch, kl_BT)
  metrics["sft/prob"] = common.token_mean(jnp.exp(jax.lax.stop_gradient(lp_BT)), batch)
  return reduce(_dft_token(lp_BT) + cfg.kl_coef * kl_BT, batch, cfg.reduction), metrics


def sft_kl(logps, batch, cfg):
  """NLL + kl_coef * KL(p_ref || p_theta) per token."""
  lp_BT, kl_BT = logps["policy"], _kl(logps, "sft_kl")
  return reduce(-lp_BT + cfg.kl_coef * kl_BT, batch, cfg.reduction), _metrics(lp_BT, batch, kl_BT)


LOSSES = {"nll": nll, "dft": dft, "asft": asft, "sft_kl": sft_kl}
