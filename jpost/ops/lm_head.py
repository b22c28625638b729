"""The LM head on [B, T, D] hidden states: per-token log-probs / entropy / KL of the targets.

Flattens to the [N, D] primitive of jpost.ops.logprobs, masks with `loss_mask`, and reshapes back;
the unembedding `w_DV` comes from the model (`models.unembedding`), so [B, T, V] logits never
exist. Outputs are float32 and exactly 0 where `loss_mask == 0`.

Under a mesh (`jax.set_mesh`, as `train.sharding.axis_rules(rules, mesh)` sets it) the op runs
in `shard_map` (jpost/ops/sharded.py): tokens split like the 'batch' rule, the vocabulary like
'vocab'. Without a mesh, or on one device, it is the unsharded op, unchanged.
"""
import jax.numpy as jnp

from jpost.ops import logprobs, sharded


def _flat(h_BTD, targets_BT, loss_mask_BT):
  b, t, d = h_BTD.shape
  if targets_BT.shape != (b, t) or loss_mask_BT.shape != (b, t):
    raise ValueError(f"h {h_BTD.shape}, targets {targets_BT.shape}, mask {loss_mask_BT.shape}")
  labels_N = jnp.where(loss_mask_BT > 0, targets_BT, -1).reshape(b * t).astype(jnp.int32)
  return h_BTD.reshape(b * t, d), labels_N


def sequence_logprobs(h_BTD, w_DV, targets_BT, loss_mask_BT, *, softcap=None, temperature=1.0,
                      with_entropy=False, impl="auto", block_sizes=None):
  """-> (logp [B, T], entropy [B, T] or None), float32, 0 where masked."""
  h_ND, labels_N = _flat(h_BTD, targets_BT, loss_mask_BT)
  kw = dict(temperature=temperature, softcap=softcap, with_entropy=with_entropy, impl=impl,
            block_sizes=block_sizes)
  layout = sharded.context_layout(*h_ND.shape, w_DV.shape[1], impl)
  if layout is None:
    logp_N, ent_N = logprobs.token_logprobs(h_ND, w_DV, labels_N, **kw)
  else:
    logp_N, ent_N = sharded.token_logprobs(h_ND, w_DV, labels_N, layout, **kw)
  shape = targets_BT.shape
  return logp_N.reshape(shape), (None if ent_N is None else ent_N.reshape(shape))


def sequence_kl(h_BTD, w_DV, h_ref_BTD, w_ref_DV, targets_BT, loss_mask_BT, *, softcap=None,
                temperature=1.0, impl="auto", block_sizes=None):
  """-> full-vocabulary KL(p_ref || p_theta) [B, T], float32, 0 where masked; grads to h, w only."""
  h_ND, labels_N = _flat(h_BTD, targets_BT, loss_mask_BT)
  h_ref_ND = h_ref_BTD.reshape(h_ND.shape)
  kw = dict(temperature=temperature, softcap=softcap, impl=impl, block_sizes=block_sizes)
  layout = sharded.context_layout(*h_ND.shape, w_DV.shape[1], impl)
  if layout is None:
    kl_N = logprobs.token_kl(h_ND, w_DV, h_ref_ND, w_ref_DV, labels_N, **kw)
  else:
    kl_N = sharded.token_kl(h_ND, w_DV, h_ref_ND, w_ref_DV, labels_N, layout, **kw)
  return kl_N.reshape(targets_BT.shape)
