"""Mixing demonstrations with rollouts (ALGORITHMS.md §5): pure helpers the online loop calls.

Host-side helpers take and return numpy arrays (they decide what to sample and how to build the
batch); `srft_weights` is jnp because it runs inside the loss on the current entropies.
Shapes: P prompts, N rollouts per prompt, G group size, B rows, T tokens.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jpost.losses import common


# ----------------------------------------------------------------------------------------------- HPT

def hpt_gate(correct_PN, gate: int = 0):
  """HPT switch: prompt p trains on its demonstration (SFT) iff k_p = #correct <= gate.

  Returns (use_sft [P] bool, {'hpt/sft_frac': fraction of prompts switched to SFT}).
  """
  correct_PN = np.asarray(correct_PN, bool)
  k_P = correct_PN.sum(axis=1)
  use_sft_P = k_P <= gate
  return use_sft_P, {"hpt/sft_frac": float(use_sft_P.mean()) if use_sft_P.size else 0.0}


# --------------------------------------------------------------------------------------------- LUFFY

def luffy_mix(group: dict, demo: dict, replace_index: int = -1) -> dict:
  """Replaces rollout `replace_index` of one group by the demonstration (LUFFY).

  `group`: arrays with a leading [G] axis (tokens, loss_mask, old_logp, sampler_logp, rewards, ...);
  `demo`: the demonstration's arrays without that axis. Keys the demonstration lacks (it has no
  sampler or behaviour log-probs) are zero on its row. Adds `offline_mask` [G, T]: the
  demonstration's loss tokens, which the loss trains with the offline ratio. Advantages are then
  computed over the mixed group as usual.
  """
  unknown = set(demo) - set(group)
  if unknown:
    raise ValueError(f"luffy_mix: demonstration keys {sorted(unknown)} are not in the group")
  out = {}
  for key, x in group.items():
    x = np.array(x, copy=True)
    x[replace_index] = demo[key] if key in demo else 0
    out[key] = x
  offline = np.zeros(np.shape(group["loss_mask"]), np.float32)
  offline[replace_index] = np.asarray(demo["loss_mask"], np.float32)
  out["offline_mask"] = offline
  return out


# ---------------------------------------------------------------------------------------------- SRFT

def srft_weights(entropy_BT, batch, sft_BT, *, sft_scale=0.5, pg_scale=0.1):
  """SRFT token weights from each sequence's token-mean entropy H (stop-gradient).

  Demonstration (sft) tokens get `sft_scale * exp(-H)`, the others `pg_scale * exp(H)`: the model
  imitates more where it is already confident and explores more where it is uncertain.
  Returns (w_sft_BT, w_pg_BT).
  """
  h_S = common.sequence_sums(entropy_BT, batch) / jnp.maximum(common.sequence_lengths(batch), 1.0)
  h_BT = jax.lax.stop_gradient(common.per_token(h_S, batch))
  w_sft_BT = jnp.where(sft_BT > 0, sft_scale * jnp.exp(-h_BT), 0.0)
  w_pg_BT = jnp.where(sft_BT > 0, 0.0, pg_scale * jnp.exp(h_BT))
  return w_sft_BT, w_pg_BT


# ---------------------------------------------------------------------------------------- Prefix-RFT

def cosine_decay(step, total_steps, start=0.95, end=0.05) -> float:
  """`start` at step 0, `end` from `total_steps` on, cosine in between (Prefix-RFT's low_t)."""
  frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
  return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def sample_prefix_lengths(rng: np.random.Generator, demo_lengths, low, high, num=1):
  """Prefix token counts [len(demo_lengths), num]: floor(u * L) with u ~ U[low, high].

  At most L - 1, so at least one demonstration token is left for the model to generate.
  """
  return prefix_lengths(rng.uniform(low, high, size=(np.size(demo_lengths), num)), demo_lengths)


def prefix_lengths(u, demo_lengths):
  """floor(u * L) for draws u [len(demo_lengths), num] in [0, 1], at most L - 1."""
  demo_lengths = np.asarray(demo_lengths, np.int64)
  if np.any(demo_lengths < 1):
    raise ValueError("prefix_lengths: every demonstration needs at least one token")
  u = np.asarray(u, np.float64)
  if u.shape[:1] != demo_lengths.shape:
    raise ValueError(f"prefix_lengths: {u.shape[0]} rows of draws for {demo_lengths.size} "
                     "demonstrations")
  k = np.floor(u * demo_lengths[:, None]).astype(np.int64)
  return np.clip(k, 0, demo_lengths[:, None] - 1)


def entropy_keep_mask(entropy_BT, prefix_mask_BT, top_frac=0.2):
  """Prefix-RFT entropy-based clipping -> adv_keep_mask [B, T].

  Per row, only the ceil(top_frac * n) highest-entropy of its n prefix tokens keep their advantage
  (1); its other prefix tokens get 0; non-prefix tokens keep 1. Ties break towards earlier tokens.
  """
  entropy_BT = np.asarray(entropy_BT, np.float64)
  prefix_BT = np.asarray(prefix_mask_BT) > 0
  keep = np.ones(entropy_BT.shape, np.float32)
  for b in range(entropy_BT.shape[0]):
    idx = np.flatnonzero(prefix_BT[b])
    if idx.size == 0:
      continue
    k = math.ceil(top_frac * idx.size)
    order = np.argsort(-entropy_BT[b, idx], kind="stable")
    keep[b, idx] = 0.0
    keep[b, idx[order[:k]]] = 1.0
  return keep


# ------------------------------------------------------------------------------------------- filters

def instance_filter(correct_PK, drop_all_correct=False):
  """Rollout instance filter: keep prompts with >= 1 correct of K (optionally < K correct).

  Returns (keep [P] bool, stats).
  """
  correct_PK = np.asarray(correct_PK, bool)
  k_P = correct_PK.sum(axis=1)
  keep_P = k_P > 0
  if drop_all_correct:
    keep_P &= k_P < correct_PK.shape[1]
  return keep_P, {"filter/kept_frac": float(keep_P.mean()) if keep_P.size else 0.0}
