"""Unpaired-feedback objectives (ALGORITHMS.md §3): KTO, BCO and the implicit process reward model.

Rows are (x, y, label) with `batch['label']` [S] (1 desirable, 0 undesirable); per example
delta = S_theta(y) - S_ref(y) (sequence sums over the loss tokens; the reference from
`logps['ref']` or the precomputed `logps['ref_seq']`). Losses are means over valid examples with
the global `denom_examples`, so they are additive over micro-batches.

Batch-level statistics, and what that means for gradient accumulation:
- KTO's reference point z is a mean over the mismatched rows of the batch. Under `jit` the batch is
  one global array sharded over the data axes, so that mean *is* the all-reduce across data shards
  the spec asks for (XLA inserts it). With gradient accumulation the train step computes z over
  all its micro-batches first (`kto_mismatch_sums` added up, a no-gradient pass over the
  mismatched pairs) and writes it into every micro-batch as the scalar `batch['kto_z']`, so the
  step's loss is exactly the one-large-batch loss (TRL lets each micro-batch use its own z).
- BCO's shift is a running mean over all past steps, carried in the train state; see `bco`.

Metrics over a subset of rows (`rewards/chosen` over desirable rows, ...) divide by the global
subset sizes `batch['denom_desirable']` / `batch['denom_undesirable']` when the step supplies
them, else see `_subset_mean` (exact without accumulation).
"""
import jax
import jax.numpy as jnp
import ml_collections

from jpost.losses import common

logsig = jax.nn.log_sigmoid
sg = jax.lax.stop_gradient

_DEFAULTS = {
    "kto": dict(beta=0.1, lambda_d=1.0, lambda_u=1.0),   # lambda_D, lambda_U: per-label weights
    "bco": dict(beta=0.1),
    "implicit_prm": dict(beta=0.05),
}


def default_config(name: str = "kto") -> ml_collections.ConfigDict:
  """ALGORITHMS.md §3 defaults for objective `name` (only the keys it reads)."""
  if name not in _DEFAULTS:
    raise ValueError(f"unknown unpaired objective {name!r}; known: {sorted(_DEFAULTS)}")
  return ml_collections.ConfigDict(_DEFAULTS[name])


# ----------------------------------------------------------------------------------------- shared

def _log_ratio(logps, batch):
  """delta [S] = S_theta(y) - S_ref(y)."""
  return common.sequence_sums(logps["policy"], batch) - common.ref_sequence_sums(logps, batch)


def _label_masks(batch):
  valid = batch["example_valid"]
  label = batch["label"]
  return label * valid, (1.0 - label) * valid


def _subset_mean(x_S, subset_S, batch, key):
  """Mean of x over a subset of rows, reported so that summing micro-batches stays meaningful.

  With the global subset size in `batch[key]` the sum over micro-batches is the exact mean. Without
  it, the local mean is weighted by this micro-batch's share of the examples: exact without
  accumulation, and the example-weighted mean of the micro-batch means with it (never k times the
  mean, which summing plain local means would give).
  """
  total = jnp.sum(x_S * subset_S)
  if key in batch:
    return total / batch[key]
  return total / jnp.maximum(jnp.sum(subset_S), 1.0) * common.local_share(batch)


def _reward_metrics(reward_S, batch):
  """Mean reward over desirable and over undesirable rows (module docstring: denominators)."""
  des, und = _label_masks(batch)
  reward_S = sg(reward_S)
  chosen = _subset_mean(reward_S, des, batch, "denom_desirable")
  rejected = _subset_mean(reward_S, und, batch, "denom_undesirable")
  return {"rewards/chosen": chosen, "rewards/rejected": rejected,
          "rewards/margin": chosen - rejected}


# -------------------------------------------------------------------------------------------- KTO

def kto_reference_point(logps, batch):
  """z = max(0, mean over valid mismatched rows of S_theta(y') - S_ref(y')), stop-gradient.

  Mismatched row i (`mismatch_*` keys) is completion i after prompt i+1; it is valid when example
  i is. The mean is over this batch's valid rows (see the module docstring on accumulation).
  """
  total, count = kto_mismatch_sums(logps, batch)
  return kto_z_from_sums(total, count)


def kto_mismatch_sums(logps, batch):
  """(sum over valid mismatched rows of S_theta(y') - S_ref(y'), number of those rows): the two
  parts of z, which add up over micro-batches."""
  valid = batch["example_valid"]
  pol = common.sequence_sums(logps["mismatch_policy"], batch, prefix="mismatch_")
  ref = common.ref_sequence_sums(logps, batch, prefix="mismatch_")
  return jnp.sum((pol - ref) * valid), jnp.sum(valid)


def kto_z_from_sums(total, count):
  return sg(jnp.maximum(total / jnp.maximum(count, 1.0), 0.0))


def kto(logps, batch, cfg):
  """KTO: desirable lambda_D (1 - sigma(beta (delta - z))), undesirable lambda_U
  (1 - sigma(beta (z - delta))), averaged over valid examples."""
  delta = _log_ratio(logps, batch)
  z = sg(batch["kto_z"]) if "kto_z" in batch else kto_reference_point(logps, batch)
  des, und = _label_masks(batch)
  # 1 - sigma(x) = sigma(-x), without the cancellation for large x.
  loss_S = (cfg.lambda_d * des * jax.nn.sigmoid(-cfg.beta * (delta - z))
            + cfg.lambda_u * und * jax.nn.sigmoid(-cfg.beta * (z - delta)))
  loss = jnp.sum(loss_S) / common.denom_examples(batch)
  metrics = _reward_metrics(cfg.beta * delta, batch)
  metrics["kto/z"] = z * common.local_share(batch)     # sums to z over micro-batches
  return loss, metrics


# -------------------------------------------------------------------------------------------- BCO

def bco_init_state():
  """BCO's objective state: the running mean of every reward r = beta * delta seen in past steps
  (`shift`) and how many rewards it averages (`count`)."""
  return {"shift": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}


def bco_update_state(state, metrics):
  """Pure: folds one step's rewards into the running mean. `metrics` are the step's metrics,
  summed over its micro-batches (so `bco/reward_sum`, `bco/reward_count` cover the whole step).

  Incremental form mean += (sum - n * mean) / (count + n): no ever-growing float32 sum whose
  rounding error grows with the run length.
  """
  n = metrics["bco/reward_count"]
  total = state["count"].astype(jnp.float32) + n
  step_sum = metrics["bco/reward_sum"]
  shift = state["shift"] + (step_sum - n * state["shift"]) / jnp.maximum(total, 1.0)
  return {"shift": shift.astype(jnp.float32),
          "count": state["count"] + jnp.round(n).astype(jnp.int32)}


def udm_weight_from_prob(p_desirable, lo=0.5, hi=10.0):
  """BCO's distribution-matching weight of an undesirable row, clip(p / (1 - p + 1e-8), lo, hi),
  from a classifier's P(desirable | prompt embedding). The classifier (TRL fits a logistic
  regression on prompt embeddings) is out of scope: its probabilities arrive with the data."""
  return jnp.clip(p_desirable / (1.0 - p_desirable + 1e-8), lo, hi)


def bco(logps, batch, cfg):
  """BCO: r = beta * delta; desirable -logsig(r - shift), undesirable -logsig(-(r - shift)).

  `shift` is read from `batch['objective_state']['shift']` (the train step puts the state there);
  it is 0 before the first update. Optional `batch['udm_weight']` [S] weights undesirable rows
  (see `udm_weight_from_prob`). The metrics `bco/reward_sum` and `bco/reward_count` (sums of
  sg(r) and of 1 over valid rows, all rows of both labels) feed `bco_update_state` after the step.
  """
  if "objective_state" not in batch:
    raise KeyError("bco reads its running reward mean from batch['objective_state'] (start from "
                   "unpaired.bco_init_state(); the train step passes TrainState.objective_state)")
  shift = sg(batch["objective_state"]["shift"])
  r = cfg.beta * _log_ratio(logps, batch)
  des, und = _label_masks(batch)
  if "udm_weight" in batch:
    und = und * batch["udm_weight"]
  loss_S = des * -logsig(r - shift) + und * -logsig(-(r - shift))
  loss = jnp.sum(loss_S) / common.denom_examples(batch)
  valid = batch["example_valid"]
  metrics = _reward_metrics(r, batch)
  metrics["bco/reward_sum"] = jnp.sum(sg(r) * valid)
  metrics["bco/reward_count"] = jnp.sum(valid)
  metrics["bco/shift"] = shift * common.local_share(batch)   # sums to the shift over micro-batches
  return loss, metrics


# ------------------------------------------------------------------------- implicit process reward

def implicit_prm(logps, batch, cfg):
  """Implicit PRM, cross-entropy form: BCE(sigma(beta delta), label) per response.

  Metrics: the shared `rewards/*` (beta delta over desirable / undesirable rows) and
  `prm_accuracy`, the fraction of responses whose implicit reward has the label's sign (named
  like the reward model's `rm_accuracy`: held out, `eval/prm_accuracy`).
  """
  z = cfg.beta * _log_ratio(logps, batch)
  label = batch["label"]
  loss_S = -(label * logsig(z) + (1.0 - label) * logsig(-z))
  metrics = _reward_metrics(z, batch)
  correct = ((sg(z) > 0) == (label > 0.5)).astype(jnp.float32)
  metrics["prm_accuracy"] = common.example_mean(correct, batch)
  return common.example_mean(loss_S, batch), metrics


def prm_token_rewards(lp_BT, ref_BT, beta, mask_BT=None):
  """Inference: the implicit PRM's per-token reward beta * (lp_t - ref_t) (0 off the mask)."""
  r = beta * (lp_BT - ref_BT)
  return r if mask_BT is None else r * mask_BT


def step_ids_from_delimiter(targets_BT, loss_mask_BT, seq_index_BT, delimiter_ids, num_examples):
  """Step number of each response token -> [B, T] int32 (-1 off the loss mask).

  Token t (the token `targets[t]`, whose reward sits at t) is in step k of its response when k
  delimiter tokens precede it in that response; a delimiter belongs to the step it ends. A
  delimiter is one token id (or any of a list of ids, e.g. the ids of "\\n\\n" in different
  contexts); multi-token delimiters need the caller to mark them.
  """
  mask = loss_mask_BT > 0
  delim = jnp.isin(targets_BT, jnp.asarray(delimiter_ids)) & mask
  d = delim.astype(jnp.int32)
  before = jnp.cumsum(d, axis=1) - d            # delimiters strictly before t in the row
  # A response is contiguous in one row: subtract the count at its first token (packed rows).
  seq = jnp.where(mask, seq_index_BT, -1).reshape(-1)
  big = jnp.iinfo(jnp.int32).max
  start_S = jax.ops.segment_min(jnp.where(seq >= 0, before.reshape(-1), big), seq,
                                num_segments=num_examples)
  start_BT = jnp.take(start_S, jnp.maximum(seq_index_BT, 0))
  return jnp.where(mask, before - start_BT, -1).astype(jnp.int32)


def prm_step_scores(token_rewards_BT, step_ids_BT, seq_index_BT, *, num_examples, max_steps):
  """Per-step rewards and per-response scores from token rewards.

  Returns a dict:
    step_rewards [S, K]  sum of the token rewards of step k (K = max_steps; 0 for absent steps)
    step_valid   [S, K]  1 where step k has at least one token
    num_steps    [S]     steps in the response (may exceed K: then steps >= K-1 are merged
                         into step K-1, so the sum stays exact; compare with K to detect it)
    min          [S]     min over the response's steps (0 for a response with no step)
    sum          [S]     sum over its steps = sum of its token rewards
  Tokens with step id < 0 (prompt, padding) are ignored.
  """
  inside = (step_ids_BT >= 0) & (seq_index_BT >= 0)
  step = jnp.minimum(step_ids_BT, max_steps - 1)
  flat = jnp.where(inside, seq_index_BT * max_steps + step, -1).reshape(-1)
  n = num_examples * max_steps
  rewards = jax.ops.segment_sum(jnp.where(inside, token_rewards_BT, 0.0).reshape(-1), flat,
                                num_segments=n).reshape(num_examples, max_steps)
  counts = jax.ops.segment_sum(inside.astype(jnp.int32).reshape(-1), flat,
                               num_segments=n).reshape(num_examples, max_steps)
  valid = counts > 0
  num_steps = jax.ops.segment_max(jnp.where(inside, step_ids_BT + 1, 0).reshape(-1),
                                  jnp.where(inside, seq_index_BT, -1).reshape(-1),
                                  num_segments=num_examples)
  num_steps = jnp.maximum(num_steps, 0)      # examples without tokens: segment_max gives INT_MIN
  min_S = jnp.min(jnp.where(valid, rewards, jnp.inf), axis=1)
  min_S = jnp.where(valid.any(axis=1), min_S, 0.0)
  return {"step_rewards": rewards, "step_valid": valid.astype(jnp.float32),
          "num_steps": num_steps, "min": min_S, "sum": rewards.sum(axis=1)}


LOSSES = {"kto": kto, "bco": bco, "implicit_prm": implicit_prm}
