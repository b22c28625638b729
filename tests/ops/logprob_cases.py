"""Problems, jitted entry points and tolerances shared by the tests of jpost.ops.

Tolerances are relative to the largest magnitude of the reference (max |got - want| <= rel *
max |want|), because the tiled implementations sum in a different order than the materialised
reference, and absolute errors scale with the size of logits, log-normalisers and gradients.
Measured on these problems (all implementations): float32 values <= 6e-7 and gradients <= 1.8e-6;
bf16 gradients <= 4.6e-3; KL values <= 5e-7 absolute.
  F32 = 2e-5: 10x the measured float32 error, i.e. float32 rounding with a different summation
    order; any formula error (a missed temperature factor, a wrong entropy term) is O(1e-1).
  BF16_GRAD = 1e-2: with bf16 inputs the backward casts dz to bf16 for the MXU/tensor-core
    matmuls (relative rounding 2^-9 per element) and returns dh, dw rounded to bf16 (2^-9), so
    errors are a few bf16 roundings of the largest gradient. Values stay at float32 accuracy
    because bf16 x bf16 products are exact in float32 and accumulate in float32.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpost import ops

F32 = 2e-5
BF16_GRAD = 1e-2
# Shared shapes, so that reference compilations are reused across test files. Ragged on purpose:
# N and V are multiples of no tile; D = 384 = 3 x 128 (pallas_tpu hidden chunks of 128) and
# 256 + 128 (a ragged last 256-wide chunk for pallas_gpu).
N, D, V = 37, 384, 1000
CAPPED = dict(temperature=0.7, softcap=5.0)   # both transforms active: logits std ~3 -> tanh bends


def problem(n, d, v, dtype=jnp.float32, seed=0, mask_frac=0.25):
  """h, w, a reference (h_ref, w_ref) nearby, labels (some masked, first two at the vocabulary
  edges so the ragged last tile holds a target) and random loss weights."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d))
  w = rng.normal(size=(d, v)) * (3.0 / np.sqrt(d))   # logits with std ~3: peaked softmaxes
  h_ref = h + 0.3 * rng.normal(size=(n, d))
  w_ref = w + 0.3 * rng.normal(size=(d, v)) / np.sqrt(d)
  labels = np.where(rng.random(n) < mask_frac, -1, rng.integers(0, v, n))
  labels[:2] = [v - 1, 0]
  c_lp, c_ent = rng.normal(size=n), rng.normal(size=n)
  cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  return dict(h=cast(h), w=cast(w), h_ref=cast(h_ref), w_ref=cast(w_ref),
              labels=jnp.asarray(labels, jnp.int32), c_lp=f32(c_lp), c_ent=f32(c_ent))


def as_f32(p):
  return {k: (x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x) for k, x in p.items()}


@functools.lru_cache(maxsize=None)
def lp_fn(impl, temperature=1.0, softcap=None, with_entropy=True, blocks=()):
  """jit(p -> ((logp, entropy), (dh, dw))) of sum(c_lp logp + c_ent entropy); cached so tests
  with the same static configuration share one compilation per input shape."""
  def f(p):
    def loss(h, w):
      lp, ent = ops.token_logprobs(h, w, p["labels"], temperature=temperature, softcap=softcap,
                                   with_entropy=with_entropy, impl=impl,
                                   block_sizes=dict(blocks))
      total = jnp.sum(p["c_lp"] * lp)
      if with_entropy:
        total += jnp.sum(p["c_ent"] * ent)
      return total, (lp, ent)
    (_, outs), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(p["h"], p["w"])
    return outs, grads
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def kl_fn(impl, temperature=1.0, softcap=None, blocks=()):
  """jit(p -> (kl, (dh, dw, dh_ref, dw_ref))) of sum(c_lp kl)."""
  def f(p):
    def loss(h, w, h_ref, w_ref):
      kl = ops.token_kl(h, w, h_ref, w_ref, p["labels"], temperature=temperature,
                        softcap=softcap, impl=impl, block_sizes=dict(blocks))
      return jnp.sum(p["c_lp"] * kl), kl
    (_, kl), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(
        p["h"], p["w"], p["h_ref"], p["w_ref"])
    return kl, grads
  return jax.jit(f)


def assert_close(got, want, rel, what, scale=None):
  """max |got - want| <= rel * scale, scale = max |want| unless given."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{what}: non-finite values"
  scale = max(np.max(np.abs(want)), 1e-30) if scale is None else scale
  err = np.max(np.abs(got - want))
  assert err <= rel * scale, f"{what}: max error {err:.3g} = {err / scale:.3g} x max|want|"


def check_lp(got, want, grad_rel, values_rel=F32):
  (lp, ent), (dh, dw) = got
  (lp_r, ent_r), (dh_r, dw_r) = want
  assert lp.dtype == jnp.float32
  assert_close(lp, lp_r, values_rel, "logp")
  if ent_r is not None:
    assert ent.dtype == jnp.float32
    assert_close(ent, ent_r, values_rel, "entropy")
  assert_close(dh, dh_r, grad_rel, "dh")
  assert_close(dw, dw_r, grad_rel, "dw")


def check_kl(got, want, grad_rel, values_atol=1e-5):
  kl, (dh, dw, dh_ref, dw_ref) = got
  kl_r, (dh_r, dw_r, _, _) = want
  # Absolute: a KL value is a difference of O(log V) terms, each good to ~1e-6 in float32, so
  # its error does not shrink with the KL (measured: <= 5e-7).
  assert_close(kl, kl_r, values_atol, "kl", scale=1.0)
  assert_close(dh, dh_r, grad_rel, "dh")
  assert_close(dw, dw_r, grad_rel, "dw")
  assert not np.any(np.asarray(dh_ref)) and not np.any(np.asarray(dw_ref)), "grad to reference"
