"""Helpers of jpost.losses.common that the objective tests do not pin down on their own."""
import decimal

import jax
import jax.numpy as jnp
import numpy as np

from jpost.losses import common


def test_log1mexp_is_accurate_over_the_whole_range():
  # Down to -87: below, exp(x) and the result are float32 subnormals (no relative accuracy).
  x = -np.concatenate([np.logspace(-6.5, np.log10(87.0), 400), [np.log(2.0)]]).astype(np.float32)
  got = np.asarray(common.log1mexp(jnp.asarray(x)), np.float64)
  # 80-digit decimal arithmetic on the same float32 inputs (no float64 formula is accurate at
  # both ends: log(-expm1(x)) loses everything for x < -37, log1p(-exp(x)) near 0).
  ctx = decimal.Context(prec=80)
  expected = np.array([float(ctx.ln(ctx.subtract(1, ctx.exp(decimal.Decimal(float(v))))))
                       for v in x])
  # A few float32 ulps everywhere.
  np.testing.assert_allclose(got, expected, rtol=4e-7)
  # What it guards against: in float32 the textbook forms are off by far more.
  x32 = x[:5]
  naive = np.log1p(-np.exp(x32))
  assert np.max(np.abs(naive / expected[:5] - 1)) > 1e-3      # >> the 4e-7 tolerance
  x32 = x[-5:-1]
  naive = np.log(-np.expm1(x32))
  assert np.max(np.abs(naive / expected[-5:-1] - 1)) > 1e-2


def test_log1mexp_gradient():
  # At (and above) 0 there is no real value: a finite value and a finite (zero) gradient, no nan.
  x = jnp.asarray([-1e-5, -0.5, -0.7, -3.0, -40.0, 0.0, 1e-3, -1e-30], jnp.float32)
  v, g = jax.jit(jax.vmap(jax.value_and_grad(common.log1mexp)))(x)
  xd = np.asarray(x[:5], np.float64)
  np.testing.assert_allclose(g[:5], -np.exp(xd) / -np.expm1(xd), rtol=2e-6)   # = -1/expm1(-x)
  assert np.all(np.isfinite(np.asarray(v))) and np.all(np.isfinite(np.asarray(g)))


def test_pair_and_example_means_use_global_denominators():
  batch = {"example_valid": np.array([1, 1, 0, 0, 1, 1], np.float32)}
  x_P = jnp.asarray([2.0, 100.0, 4.0])
  np.testing.assert_allclose(common.pair_mean(x_P, batch), 3.0)
  np.testing.assert_allclose(common.pair_mean(x_P, dict(batch, denom_examples=6.0)), 1.0)
  np.testing.assert_allclose(common.local_share(batch, per=2), 1.0)
  np.testing.assert_allclose(common.local_share(dict(batch, denom_examples=8.0)), 0.5)
  x_S = jnp.arange(6.0)
  np.testing.assert_allclose(common.example_mean(x_S, batch), (0 + 1 + 4 + 5) / 4)
