"""The train state and the one jitted offline `train_step` shared by every offline objective.

A step receives k stacked micro-batches (leaves shaped [k, b, ...]; k = train.grad_accum). The
global denominators (loss tokens, examples or pairs) are computed over all k first and written into
every micro-batch, so summing the micro-batch losses and gradients gives exactly the loss and
gradient of one large batch (losses are additive; docs/architecture.md).
"""
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jpost.losses import unpaired
from jpost.train import forward


@flax.struct.dataclass
class TrainState:
  step: jax.Array                 # int32 scalar: optimiser updates applied (skips included)
  params: Any                     # {'lm': decoder params, optional 'reward_head': ...}
  opt_state: Any
  rng: jax.Array                  # a raw uint32 PRNG key (orbax-saveable), split per step
  objective_state: Any            # e.g. BCO's running reward mean; {} for stateless objectives
  skipped_steps: jax.Array        # total steps skipped for non-finite loss / gradients
  nonfinite_streak: jax.Array     # consecutive skips (the loop aborts after a limit)


def trainable(tree):
  """The part of a params-shaped tree (params, grads, axes, shardings) the optimiser updates.

  With LoRA adapters (a 'lora' entry) the base decoder 'lm' is frozen: only the adapters and any
  head are trained, get gradients and optimiser state. Otherwise everything is trained.
  """
  if "lora" in tree:
    return {k: v for k, v in tree.items() if k != "lm"}
  return tree


def with_trainable(params, new_trainable):
  """`params` with its trainable part replaced (the frozen base, if any, kept as is)."""
  if "lora" in params:
    return dict(new_trainable, lm=params["lm"])
  return new_trainable


def init_state(params, optimizer, seed: int, objective_state=None) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(trainable(params)),
      rng=jax.random.PRNGKey(seed), objective_state=objective_state or {},
      skipped_steps=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32))


def with_global_denominators(batch, denom_unit: str):
  """Adds `denom_tokens` / `denom_examples` (totals over all k micro-batches) to each of them."""
  k = batch["loss_mask"].shape[0]
  tokens = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
  examples = jnp.sum(batch["example_valid"].astype(jnp.float32))
  if denom_unit == "pairs":
    examples = examples / 2
  examples = jnp.maximum(examples, 1.0)
  return dict(batch, denom_tokens=jnp.full((k,), tokens), denom_examples=jnp.full((k,), examples))


def with_whole_step_kto_z(spec: forward.ForwardSpec, params, ref_params, batch):
  """KTO's z over all k micro-batches (ALGORITHMS.md: a mean over the batch), written into each
  as `kto_z` [k]. One no-gradient pass over the mismatched pairs (without LoRA dropout); the
  gradient pass then skips them, so accumulation costs no extra forward."""
  def sums(mb):
    return unpaired.kto_mismatch_sums(forward.mismatch_logps(spec, params, ref_params, mb), mb)

  totals, counts = jax.lax.map(sums, batch)
  z = unpaired.kto_z_from_sums(jnp.sum(totals), jnp.sum(counts))
  return dict(batch, kto_z=jnp.broadcast_to(z, totals.shape))


def combine_metrics(stacked):
  """Micro-batch metrics [k] -> one value: additive by contract, `_max` / `_min` by max / min."""
  def one(name, v):
    if name.endswith("_max"):
      return jnp.max(v)
    if name.endswith("_min"):
      return jnp.min(v)
    return jnp.sum(v)
  return {name: one(name, v) for name, v in stacked.items()}


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all()


def make_train_step(spec: forward.ForwardSpec, loss_fn: Callable, loss_cfg, denom_unit: str,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    update_objective_state: Callable | None = None):
  """Builds `train_step(state, ref_params, batch) -> (state, metrics)` (to be jitted).

  Gradients are taken w.r.t. `trainable(state.params)` only: with LoRA the frozen base is an
  input of the loss, never differentiated, and has no optimiser state.
  """
  lora_dropout = spec.lora is not None and spec.lora.dropout > 0

  def micro_loss(train_params, params, ref_params, mb, objective_state, rng):
    params = with_trainable(params, train_params)
    logps = forward.compute_logps(spec, params, ref_params, mb, rng)
    if update_objective_state is not None:
      mb = dict(mb, objective_state=objective_state)
    loss, metrics = loss_fn(logps, mb, loss_cfg)
    return loss, metrics

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, ref_params, batch):
    batch = with_global_denominators(batch, denom_unit)
    if spec.needs_mismatch and batch["loss_mask"].shape[0] > 1:
      batch = with_whole_step_kto_z(spec, state.params, ref_params, batch)

    train_params = trainable(state.params)

    def accumulate(grads_acc, mb_and_rng):
      mb, rng = mb_and_rng
      (loss, metrics), grads = grad_fn(train_params, state.params, ref_params, mb,
                                       state.objective_state, rng)
      grads_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
      return grads_acc, (loss, metrics)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train_params)
    # LoRA dropout: one key per micro-batch, from the state's rng (which advances every step).
    rngs = (jax.random.split(jax.random.fold_in(state.rng, 1), batch["loss_mask"].shape[0])
            if lora_dropout else None)
    grads, (losses, metrics) = jax.lax.scan(accumulate, zeros, (batch, rngs))
    loss = jnp.sum(losses)
    metrics = combine_metrics(metrics)

    finite = jnp.isfinite(loss) & _all_finite(grads)
    # Non-finite values must not reach the optimiser state (Adam's moments would keep the NaN),
    # so the update is computed on zeroed gradients and then discarded by the select below.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, train_params)
    new_train_params = optax.apply_updates(train_params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    objective_state = state.objective_state
    if update_objective_state is not None:
      objective_state = keep(update_objective_state(objective_state, metrics), objective_state)

    skipped = state.skipped_steps + (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=with_trainable(state.params, keep(new_train_params, train_params)),
        opt_state=keep(new_opt_state, state.opt_state),
        rng=jax.random.split(state.rng)[0],
        objective_state=objective_state,
        skipped_steps=skipped,
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    metrics.update({
        "train/loss": loss,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
        "train/skipped_steps": skipped,
        "train/nonfinite_streak": new_state.nonfinite_streak,
        "train/tokens": jnp.sum(batch["segment_ids"] > 0),
        "train/loss_tokens": jnp.sum(batch["loss_mask"]),
    })
    return new_state, metrics

  return train_step


def make_eval_step(spec: forward.ForwardSpec, loss_fn: Callable, loss_cfg, with_greedy: bool):
  """`eval_step(params, ref_params, batch) -> metrics` for one eval batch (no stacking).

  The caller puts the totals of the whole eval set into `denom_*`, so summing the per-batch
  metrics gives exact full-set means.
  """

  def eval_step(params, ref_params, batch, objective_state):
    logps = forward.compute_logps(spec, params, ref_params, batch)   # no rng: no dropout
    if objective_state:
      batch = dict(batch, objective_state=objective_state)
    loss, metrics = loss_fn(logps, batch, loss_cfg)
    metrics = dict(metrics, loss=loss)
    if with_greedy:
      lm = forward.policy_lm(spec, params)
      h = forward.hidden(spec.model_cfg, lm, batch)
      match_BT = forward.greedy_match(spec.model_cfg, lm, h, batch)
      # An example is correct when every one of its loss tokens is the arg-max token.
      miss_BT = (1.0 - match_BT) * batch["loss_mask"]
      misses_S = jax.ops.segment_sum(miss_BT.reshape(-1), batch["seq_index"].reshape(-1),
                                     num_segments=batch["example_valid"].shape[0])
      correct = jnp.sum((misses_S == 0) * batch["example_valid"])
      metrics["accuracy"] = correct / batch["denom_examples"]
    return metrics

  return eval_step
