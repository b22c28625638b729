"""blockwise (the portable default) and lm_head against the materialised reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from logprob_cases import (BF16_GRAD, CAPPED, D, F32, N, V, as_f32, check_kl, check_lp, kl_fn,
                           lp_fn, problem)

from jpost import ops
from jpost.ops import lm_head

BLOCKS = (("token", 16), ("vocab", 128))   # both last tiles ragged: 37 = 2*16+5, 1000 = 7*128+104


@pytest.mark.parametrize("kw", [{}, CAPPED], ids=["plain", "temperature+softcap"])
def test_logprobs_match_reference_f32(kw):
  p = problem(N, D, V)
  check_lp(lp_fn("blockwise", blocks=BLOCKS, **kw)(p), lp_fn("reference", **kw)(p), F32)


def test_logprobs_bf16_inputs():
  p = problem(N, D, V, dtype=jnp.bfloat16)
  got = lp_fn("blockwise", blocks=BLOCKS, **CAPPED)(p)
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  # Reference: float32 math on the same (bf16-representable) values.
  check_lp(got, lp_fn("reference", **CAPPED)(as_f32(p)), BF16_GRAD)


def test_logprobs_without_entropy():
  # The reference loss with zero entropy weights is the no-entropy loss (same compiled function).
  p = problem(N, D, V)
  got = lp_fn("blockwise", with_entropy=False, blocks=BLOCKS)(p)
  assert got[0][1] is None
  (lp_r, _), grads_r = lp_fn("reference")(dict(p, c_ent=jnp.zeros_like(p["c_ent"])))
  check_lp(got, ((lp_r, None), grads_r), F32)


def test_masked_tokens_output_zero_and_get_no_gradient():
  p = problem(N, D, V, mask_frac=0.5)
  (lp, ent), (dh, _) = lp_fn("blockwise", blocks=BLOCKS)(p)
  masked = np.asarray(p["labels"]) < 0
  assert masked.sum() > 5
  assert not np.any(np.asarray(lp)[masked]) and not np.any(np.asarray(ent)[masked])
  assert not np.any(np.asarray(dh)[masked])


def test_large_ragged_vocab_forward():
  """V = 32000 + 7 with the default tiles: the last vocabulary tile overlaps the one before."""
  p = problem(5, 16, 32007)
  fwd = jax.jit(lambda p, impl: ops.token_logprobs(p["h"], p["w"], p["labels"],
                                                   with_entropy=True, impl=impl),
                static_argnums=1)
  (lp, ent), (lp_r, ent_r) = fwd(p, "blockwise"), fwd(p, "reference")
  np.testing.assert_allclose(lp, lp_r, rtol=0, atol=F32 * np.abs(lp_r).max())
  np.testing.assert_allclose(ent, ent_r, rtol=0, atol=F32 * np.abs(ent_r).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kl_matches_reference(dtype):
  p = problem(N, D, V, dtype=dtype)
  got = kl_fn("blockwise", blocks=BLOCKS, **CAPPED)(p)
  check_kl(got, kl_fn("reference", **CAPPED)(as_f32(p)),
           F32 if dtype == jnp.float32 else BF16_GRAD)


def test_kl_of_identical_models_is_zero():
  p = problem(N, D, V)
  kl, (dh, dw, _, _) = kl_fn("blockwise", blocks=BLOCKS, **CAPPED)(
      dict(p, h_ref=p["h"], w_ref=p["w"]))
  np.testing.assert_allclose(kl, 0.0, atol=1e-5)
  # p == q: the gradient p - q vanishes up to rounding of the two (identical) normalisers.
  assert np.abs(np.asarray(dh)).max() < 1e-4 and np.abs(np.asarray(dw)).max() < 1e-4


def test_jit_and_eager_agree():
  p = problem(N, D, V)
  args = (p["h"], p["w"], p["labels"])
  kw = dict(with_entropy=True, impl="blockwise", block_sizes=dict(BLOCKS), **CAPPED)
  eager = ops.token_logprobs(*args, **kw)
  jitted = jax.jit(lambda *a: ops.token_logprobs(*a, **kw))(*args)
  for e, j in zip(eager, jitted):
    np.testing.assert_allclose(e, j, rtol=1e-6, atol=1e-6)


def test_lm_head_flattens_masks_and_reshapes():
  b, t = 3, 5
  p = problem(b * t, 16, 100, mask_frac=0.0)
  h_BTD = p["h"].reshape(b, t, 16)
  targets = p["labels"].reshape(b, t)
  mask = (np.arange(t)[None, :] < np.array([[5], [2], [0]])).astype(np.float32)
  lp, ent = lm_head.sequence_logprobs(h_BTD, p["w"], targets, mask, with_entropy=True,
                                      impl="reference", **CAPPED)
  labels = jnp.where(mask.reshape(-1) > 0, p["labels"], -1)
  lp_n, ent_n = ops.token_logprobs(p["h"], p["w"], labels, with_entropy=True,
                                   impl="reference", **CAPPED)
  assert lp.shape == ent.shape == (b, t)
  np.testing.assert_array_equal(lp, lp_n.reshape(b, t))
  np.testing.assert_array_equal(ent, ent_n.reshape(b, t))
  assert not np.any(np.asarray(lp)[mask == 0]) and np.all(np.asarray(lp)[mask > 0] < 0)
  kl = lm_head.sequence_kl(h_BTD, p["w"], p["h_ref"].reshape(b, t, 16), p["w_ref"], targets,
                           mask, impl="reference")
  assert kl.shape == (b, t) and not np.any(np.asarray(kl)[mask == 0])
  assert np.all(np.asarray(kl)[mask > 0] > 0)
