"""From a batch to the per-token statistics an objective asks for (the `logps` dict).

This is the only place that runs the model for offline objectives: policy and reference forward
passes, the fused log-prob / entropy / KL primitive on the model's unembedding, the scalar head for
reward models, and the greedy-match statistic for evaluation. Logits [B, T, V] are never built.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jpost import models
from jpost.adapters import lora
from jpost.models import heads
from jpost.ops import lm_head


@dataclasses.dataclass(frozen=True)
class ForwardSpec:
  """Static description of one objective's forward pass (hashable: closed over by jit)."""
  model_cfg: Any
  needs_ref: bool = False
  needs_entropy: bool = False
  needs_kl: bool = False
  needs_mismatch: bool = False
  needs_values: bool = False  # PPO: a scalar value head on the policy's hidden states
  head: str = "lm"            # 'lm' | 'reward'
  impl: str = "auto"          # token_logprobs implementation
  temperature: float = 1.0
  lora: Any = None            # jpost.adapters.lora.LoraSpec when params carry 'lora' adapters


def hidden(model_cfg, lm_params, batch, prefix=""):
  return models.apply(model_cfg, lm_params, batch[prefix + "tokens"],
                      batch[prefix + "positions"], batch[prefix + "segment_ids"])


def _token_logps(spec, lm_params, h_BTD, batch, prefix="", with_entropy=False):
  return lm_head.sequence_logprobs(
      h_BTD, models.unembedding(spec.model_cfg, lm_params), batch[prefix + "targets"],
      batch[prefix + "loss_mask"], softcap=spec.model_cfg.final_softcap,
      temperature=spec.temperature, with_entropy=with_entropy, impl=spec.impl)


def policy_lm(spec: ForwardSpec, params, rng=None):
  """The policy's decoder params: `params['lm']`, with the LoRA adapters attached when params
  has 'lora' (`rng`: this micro-batch's dropout key; None = no dropout)."""
  if "lora" not in params:
    return params["lm"]
  if spec.lora is None:
    raise ValueError("params hold LoRA adapters but ForwardSpec.lora is None")
  return lora.attach(params["lm"], params["lora"], spec.lora, rng)


def reference_lm(params, ref_params):
  """The frozen reference: `ref_params['lm']`, or with LoRA and no ref_params the base itself
  (adapters off), so the reference costs no second copy of the weights."""
  if ref_params is not None:
    return jax.lax.stop_gradient(ref_params["lm"])
  if "lora" in params:
    return jax.lax.stop_gradient(params["lm"])
  raise ValueError("this objective needs the reference model, but ref_params is None")


def compute_logps(spec: ForwardSpec, params, ref_params, batch, rng=None):
  """Returns the `logps` dict of docs/architecture.md for one micro-batch (`rng`: LoRA dropout
  in training steps)."""
  cfg = spec.model_cfg
  lm = policy_lm(spec, params, rng)
  logps = {}
  h_BTD = hidden(cfg, lm, batch)
  if spec.head == "reward":
    logps["reward"] = heads.last_token_scalar(params["reward_head"], h_BTD, batch)
    return logps

  logps["policy"], entropy = _token_logps(spec, lm, h_BTD, batch, with_entropy=spec.needs_entropy)
  if spec.needs_entropy:
    logps["entropy"] = entropy
  if spec.needs_values:
    # The value head shares the policy's trunk (one forward pass); its loss also trains the trunk.
    logps["values"] = heads.scalar(params["value_head"], h_BTD)

  if spec.needs_ref and "ref_seq_logp" in batch:
    logps["ref_seq"] = batch["ref_seq_logp"]
  elif spec.needs_ref or spec.needs_kl:
    ref_lm = reference_lm(params, ref_params)
    h_ref = hidden(cfg, ref_lm, batch)
    if spec.needs_ref:
      logps["ref"], _ = _token_logps(spec, ref_lm, h_ref, batch)
    if spec.needs_kl:
      logps["kl"] = lm_head.sequence_kl(
          h_BTD, models.unembedding(cfg, lm), h_ref, models.unembedding(cfg, ref_lm),
          batch["targets"], batch["loss_mask"], softcap=cfg.final_softcap,
          temperature=spec.temperature, impl=spec.impl)

  # KTO's mismatched pairs serve only its reference point z; a step that computed z for all its
  # micro-batches at once passes it as `kto_z` (jpost/train/step.py), and they are not rerun.
  if spec.needs_mismatch and "kto_z" not in batch:
    logps.update(mismatch_logps(spec, params, ref_params, batch, rng, lm=lm))
  return logps


def mismatch_logps(spec: ForwardSpec, params, ref_params, batch, rng=None, *, lm=None):
  """{'mismatch_policy', 'mismatch_ref'}: token log-probs of the mismatched pairs (`mismatch_*`
  batch keys: completion i after prompt i + 1) under the policy and the reference."""
  cfg = spec.model_cfg
  lm = policy_lm(spec, params, rng) if lm is None else lm
  h_mm = hidden(cfg, lm, batch, prefix="mismatch_")
  ref_lm = reference_lm(params, ref_params)
  h_mm_ref = hidden(cfg, ref_lm, batch, prefix="mismatch_")
  return {"mismatch_policy": _token_logps(spec, lm, h_mm, batch, prefix="mismatch_")[0],
          "mismatch_ref": _token_logps(spec, ref_lm, h_mm_ref, batch, prefix="mismatch_")[0]}


def greedy_match(model_cfg, lm_params, h_BTD, batch, vocab_block=2048):
  """[B, T] 1.0 where the target is the arg-max next token (teacher forcing), else 0.

  All completion tokens matching means greedy decoding reproduces the completion exactly, which
  makes this the held-out accuracy for SFT. Soft-cap and temperature are monotone, so they do not
  change the arg-max; the max and the target logit come from the same tiles, so ties compare
  exactly. Scans over vocabulary blocks so [B, T, V] is never materialised.
  """
  w_DV = models.unembedding(model_cfg, lm_params)
  d, v = w_DV.shape
  n_blocks = -(-v // vocab_block)
  w_pad = jnp.pad(w_DV, ((0, 0), (0, n_blocks * vocab_block - v)))
  w_blocks = w_pad.reshape(d, n_blocks, vocab_block).transpose(1, 0, 2)
  h_ND = h_BTD.reshape(-1, d)
  labels_N = batch["targets"].reshape(-1)

  def block(carry, xs):
    best_N, target_N = carry
    w_block, start = xs
    z_NV = jnp.dot(h_ND, w_block, preferred_element_type=jnp.float32)
    col = start + jnp.arange(vocab_block)
    z_NV = jnp.where(col[None, :] < v, z_NV, -jnp.inf)
    target_N = target_N + jnp.sum(jnp.where(col[None, :] == labels_N[:, None], z_NV, 0.0), -1)
    return (jnp.maximum(best_N, z_NV.max(-1)), target_N), None

  init = (jnp.full(labels_N.shape, -jnp.inf), jnp.zeros(labels_N.shape))
  (best_N, target_N), _ = jax.lax.scan(
      block, init, (w_blocks, jnp.arange(n_blocks) * vocab_block))
  return (target_N >= best_N).astype(jnp.float32).reshape(batch["targets"].shape)
