"""Materialised-logits implementation: the numeric ground truth for tests (memory O(N V)).

Plain autodiff through log_softmax, no custom VJP, so the tiled implementations' hand-written
backward passes are checked against an independent derivation.
"""
import jax
import jax.numpy as jnp

from jpost.ops import tile_math


def logits(h, w, temperature, softcap):
  a = jnp.dot(h, w, preferred_element_type=jnp.float32)
  return tile_math.transform(a, temperature, softcap)[0]


def token_logprobs(h, w, labels, spec):
  z_NV = logits(h, w, spec.temperature, spec.softcap)
  logp_NV = jax.nn.log_softmax(z_NV, axis=-1)
  valid = labels >= 0
  safe = jnp.where(valid, labels, 0)
  logp = jnp.take_along_axis(logp_NV, safe[:, None], axis=-1)[:, 0]
  logp = jnp.where(valid, logp, 0.0)
  ent = None
  if spec.with_entropy:
    ent = jnp.where(valid, -jnp.sum(jnp.exp(logp_NV) * logp_NV, axis=-1), 0.0)
  return logp, ent


def token_kl(h, w, h_ref, w_ref, labels, spec):
  logp_NV = jax.nn.log_softmax(logits(h, w, spec.temperature, spec.softcap), axis=-1)
  h_ref, w_ref = jax.lax.stop_gradient((h_ref, w_ref))
  logq_NV = jax.nn.log_softmax(logits(h_ref, w_ref, spec.temperature, spec.softcap), axis=-1)
  kl = jnp.sum(jnp.exp(logq_NV) * (logq_NV - logp_NV), axis=-1)
  return jnp.where(labels >= 0, kl, 0.0)
