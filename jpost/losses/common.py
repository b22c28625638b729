"""Reductions shared by every objective: per-example sums and the global denominators.

Losses are additive over micro-batches (docs/architecture.md): each divides by the denominators of
the *whole* accumulated batch, which the train step writes into the batch as `denom_tokens` and
`denom_examples`. Called on a plain batch, the batch's own counts are used.
"""
import jax
import jax.numpy as jnp


def num_examples(batch) -> int:
  """Static number of example slots S in the batch."""
  return batch["example_valid"].shape[0]


def sequence_sums(x_BT, batch, *, prefix=""):
  """Sum of `x * loss_mask` per example -> [S] (segment-aware: works on packed rows)."""
  mask_BT = batch[prefix + "loss_mask"]
  seq_BT = batch[prefix + "seq_index"]
  values = (x_BT * mask_BT).reshape(-1)
  # Padding tokens carry seq_index -1: segment_sum drops out-of-range ids.
  return jax.ops.segment_sum(values, seq_BT.reshape(-1), num_segments=num_examples(batch))


def sequence_lengths(batch, *, prefix=""):
  """Number of loss tokens |y| per example -> [S]."""
  return sequence_sums(jnp.ones_like(batch[prefix + "loss_mask"]), batch, prefix=prefix)


def denom_tokens(batch):
  """Loss tokens in the whole (accumulated) batch."""
  if "denom_tokens" in batch:
    return batch["denom_tokens"]
  return jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)


def denom_examples(batch, *, per=1):
  """Valid examples (per=1) or pairs (per=2) in the whole (accumulated) batch.

  The train step stores the count of *units the loss averages over* in `denom_examples`, so a
  pairwise loss finds the pair count there; `per` only matters when computing it locally.
  """
  if "denom_examples" in batch:
    return batch["denom_examples"]
  return jnp.maximum(jnp.sum(batch["example_valid"]) / per, 1.0)


def pair_split(x_S):
  """[S] interleaved (chosen 2p, rejected 2p+1) -> ([P] chosen, [P] rejected)."""
  return x_S[0::2], x_S[1::2]


def subset_denominator(batch, key, subset_BT):
  """Global size of a token subset (e.g. on-policy tokens of a mixed batch).

  The train step may store the total over all micro-batches as `batch[key]`; otherwise the local
  count is used, which is exact when there is no gradient accumulation.
  """
  if key in batch:
    return batch[key]
  return jnp.maximum(jnp.sum(subset_BT), 1.0)


def per_token(x_S, batch, *, prefix=""):
  """Per-example values [S] -> [B, T] on each example's tokens (0 on padding, seq_index -1)."""
  seq_BT = batch[prefix + "seq_index"]
  return jnp.where(seq_BT >= 0, jnp.take(x_S, jnp.maximum(seq_BT, 0)), 0.0)


def token_mean(x_BT, batch):
  """sum(x * loss_mask) / denom_tokens: a token mean over the whole (accumulated) batch."""
  return jnp.sum(x_BT * batch["loss_mask"]) / denom_tokens(batch)


def example_mean(x_S, batch):
  """sum over valid examples of x / denom_examples: an example mean over the whole batch."""
  return jnp.sum(x_S * batch["example_valid"]) / denom_examples(batch)


def pair_valid(batch):
  """[P] 1 where both the chosen and the rejected slot of the pair hold an example."""
  valid_w, valid_l = pair_split(batch["example_valid"])
  return valid_w * valid_l


def pair_mean(x_P, batch):
  """sum over valid pairs of x / denom_examples (which holds the pair count for pairwise data)."""
  return jnp.sum(x_P * pair_valid(batch)) / denom_examples(batch, per=2)


def local_share(batch, *, per=1):
  """This micro-batch's share of the accumulated batch's examples (per=1) or pairs (per=2).

  A quantity that is one number for the whole step (KTO's z, BCO's shift) is reported as
  `value * local_share` so that the sum over micro-batches, the metrics contract, is the value.
  """
  local = pair_valid(batch).sum() if per == 2 else batch["example_valid"].sum()
  return local / denom_examples(batch, per=per)


def ref_sequence_sums(logps, batch, *, prefix=""):
  """Reference S_ref(y) per example -> [S]: precomputed `{prefix}ref_seq` or summed `{prefix}ref`.

  Both paths give the same value (the precomputed one is the sum of the same masked tokens).
  """
  if prefix + "ref_seq" in logps:
    # Slots without an example may hold anything in a precomputed table; zero them so a stray
    # nan there cannot reach the loss or its gradient.
    return jnp.where(batch["example_valid"] > 0, logps[prefix + "ref_seq"], 0.0)
  if prefix + "ref" in logps:
    return sequence_sums(logps[prefix + "ref"], batch, prefix=prefix)
  raise KeyError(f"this objective needs logps[{prefix + 'ref'!r}] (token-level) or "
                 f"logps[{prefix + 'ref_seq'!r}] (precomputed); the objective's registry entry "
                 f"should have needs_ref=True")


def log1mexp(x):
  """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler, 2012).

  Near 0, `1 - exp(x)` cancels catastrophically, so use log(-expm1(x)); far below, expm1 is fine
  but log1p(-exp(x)) keeps the tiny exp(x) exactly. Each branch gets a safe dummy input where it
  is not selected: a `where` over an inf/nan branch still gives a nan gradient (0 * inf).
  x >= 0 has no real value; x is clamped to at most -eps (float32 machine epsilon, 1.2e-7: below
  the resolution of a float32 log-prob computed as logit - logsumexp), which keeps the value
  (>= -16) and the gradient finite for log-probs that round to 0.
  """
  x = jnp.minimum(x, -jnp.finfo(jnp.float32).eps)
  near = x > -0.6931471805599453      # -log 2: the crossover of the two forms
  x_near = jnp.where(near, x, -1.0)
  x_far = jnp.where(near, -1.0, x)
  return jnp.where(near, jnp.log(-jnp.expm1(x_near)), jnp.log1p(-jnp.exp(x_far)))
