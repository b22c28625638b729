"""Choosing an implementation: auto's logged choice, interpret mode, the logged fallback, and
the Pallas kernels' lowering for their real platforms (cross-compiled from this CPU host)."""
import logging

import jax
import jax.numpy as jnp
import pytest
from logprob_cases import problem

from jpost import ops
from jpost.ops import logprobs
from jpost.ops.spec import BlockSizes, OpSpec

LOGGER = "jpost.ops.logprobs"


def _trace(impl, block_sizes=None):
  """Traces (no compilation) token_logprobs and returns the jaxpr text."""
  p = problem(37, 64, 300)
  return str(jax.make_jaxpr(lambda h, w, lab: ops.token_logprobs(
      h, w, lab, with_entropy=True, impl=impl, block_sizes=block_sizes))(
          p["h"], p["w"], p["labels"]))


@pytest.fixture
def fresh_log_state(monkeypatch):
  monkeypatch.setattr(logprobs, "_logged", set())
  monkeypatch.setattr(logprobs, "_probed", {})


def test_auto_logs_its_choice_once(caplog, fresh_log_state):
  with caplog.at_level(logging.INFO, logger=LOGGER):
    jaxpr = _trace("auto")
    _trace("auto")
  msgs = [r.getMessage() for r in caplog.records if "impl='auto'" in r.getMessage()]
  assert msgs == ["jpost.ops: impl='auto' on backend 'cpu' -> 'blockwise'"]
  assert logprobs.AUTO_IMPL["cpu"] == "blockwise" and "pallas_call" not in jaxpr


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_for_another_platform_runs_interpreted_and_says_so(caplog, fresh_log_state, impl):
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    jaxpr = _trace(impl)
  assert "pallas_call" in jaxpr
  assert any("interpret mode" in r.getMessage() and impl in r.getMessage()
             for r in caplog.records)


def test_kernel_that_fails_to_compile_falls_back_with_a_warning(caplog, fresh_log_state):
  # interpret=False on CPU: XLA:CPU cannot compile a Mosaic kernel -- a real compile error.
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    jaxpr = _trace("pallas_tpu", BlockSizes(interpret=False))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings
  assert "falling back to blockwise" in warnings[0]
  assert "Only interpret mode is supported on CPU backend" in warnings[0]
  assert "pallas_call" not in jaxpr


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match="unknown impl"):
    _trace("cuda_magic")


@pytest.mark.parametrize("impl,platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
@pytest.mark.parametrize("kind", ["lp", "kl"])
def test_kernels_lower_for_their_platform(impl, platform, kind):
  """Lowers forward + both backward kernels to Mosaic (TPU) / Triton IR (CUDA) with bf16 inputs,
  ragged N and V, soft-cap and temperature. This runs JAX's Pallas lowering rules (block-shape
  rules, op support, power-of-two shapes); the Mosaic / Triton compilers themselves run only on
  the device, so this is necessary, not sufficient."""
  spec = OpSpec(temperature=0.9, softcap=30.0, with_entropy=True,
                blocks=BlockSizes(interpret=False, hidden=256), interpret=False)
  shapes = ((1001, 512), (512, 32007), jnp.dtype(jnp.bfloat16))
  f = logprobs._value_and_grads(kind, impl, spec)
  exported = jax.export.export(
      jax.jit(f), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
          *logprobs._probe_inputs(kind, shapes))
  text = exported.mlir_module()
  target = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
  assert text.count(target) == 3   # forward, dh, dw


def test_probe_catches_a_kernel_that_compiles_but_computes_wrong_values(monkeypatch,
                                                                        fresh_log_state):
  """The first-use check that guards auto on accelerators: a kernel whose log-normaliser is off
  by 0.5 compiles fine and must still be refused. (A stand-in for a miscompiled kernel: the
  real kernels cannot compile on this CPU host.)"""
  from jpost.ops import blockwise

  class Broken:
    lp_bwd = staticmethod(blockwise.lp_bwd)

    @staticmethod
    def lp_fwd(h, w, labels, spec):
      lse, zy, ent = blockwise.lp_fwd(h, w, labels, spec)
      return lse + 0.5, zy, ent

  real_module = logprobs.impl_module
  monkeypatch.setattr(logprobs, "impl_module",
                      lambda name: Broken if name == "pallas_gpu" else real_module(name))
  # The probe's own tiny problem and tiles, so its compilations are shared by the two calls.
  spec = OpSpec(with_entropy=True, blocks=BlockSizes(interpret=False))
  shapes = ((19, 128), (128, 1000), jnp.dtype(jnp.bfloat16))
  error = logprobs._probe("lp", "pallas_gpu", spec, shapes)
  assert error is not None and "values differ from blockwise" in error, error
  assert logprobs._probe("lp", "blockwise", spec, shapes) is None
