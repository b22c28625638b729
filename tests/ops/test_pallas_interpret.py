"""Both Pallas kernels, run by the Pallas interpreter on CPU, against the reference.

The interpreter fills out-of-bounds block reads with NaN, so a missing mask on a ragged edge
fails these tests instead of passing by luck. It checks the kernels' numerics and plumbing, not
Mosaic/Triton lowering limits (see test_dispatch.py for the lowering checks).
"""
import jax.numpy as jnp
import pytest
from logprob_cases import (BF16_GRAD, CAPPED, D, F32, N, V, as_f32, check_kl, check_lp, kl_fn,
                           lp_fn, problem)

# pallas_tpu: (8, 128)-aligned tiles, 3 hidden chunks of 128 on the forward grid.
# pallas_gpu: power-of-two tiles, hidden chunks of 256 (the last one ragged, 128 wide), and
# vocabulary / gradient splits > 1 so the XLA merges of partial results are exercised.
BLOCKS = {
    "pallas_tpu": (("token", 16), ("vocab", 128), ("hidden", 128), ("interpret", True)),
    "pallas_gpu": (("token", 16), ("vocab", 128), ("hidden", 256), ("splits", 3),
                   ("interpret", True)),
}
IMPLS = sorted(BLOCKS)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_f32_temperature_softcap(impl):
  p = problem(N, D, V)
  check_lp(lp_fn(impl, blocks=BLOCKS[impl], **CAPPED)(p), lp_fn("reference", **CAPPED)(p), F32)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_bf16_without_entropy(impl):
  # Without entropy the kernels carry fewer statistics and residuals: a separate code path.
  # The reference loss with zero entropy weights is the same loss (shared compilation).
  p = problem(N, D, V, dtype=jnp.bfloat16, mask_frac=0.5)
  got = lp_fn(impl, with_entropy=False, blocks=BLOCKS[impl])(p)
  assert got[0][1] is None
  assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.bfloat16
  (lp_r, _), grads_r = lp_fn("reference")(as_f32(dict(p, c_ent=jnp.zeros_like(p["c_ent"]))))
  check_lp(got, ((lp_r, None), grads_r), BF16_GRAD)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_f32_temperature_softcap(impl):
  p = problem(N, D, V)
  check_kl(kl_fn(impl, blocks=BLOCKS[impl], **CAPPED)(p), kl_fn("reference", **CAPPED)(p), F32)
