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
