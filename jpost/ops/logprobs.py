"""token_logprobs / token_kl: the fused log-prob hot path (DESIGN.md section 3).

Public entry points, the custom VJPs, and the choice of implementation:
  reference   materialises [N, V] logits; plain autodiff; tests only.
  blockwise   pure jnp tiles under XLA loops; every backend; the portable default.
  pallas_tpu  Mosaic kernels (jpost/ops/pallas_tpu.py).
  pallas_gpu  Triton kernels (jpost/ops/pallas_gpu.py).
  auto        AUTO_IMPL[backend], logged once.
A Pallas kernel is compiled ahead of use for the exact shapes (and checked numerically against
blockwise on a tiny problem); if either fails, the call falls back to blockwise with a WARNING
naming the error. A kernel for another platform runs in interpret mode, also logged.
"""
import functools
import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jpost.ops import blockwise, reference
from jpost.ops.spec import BlockSizes, OpSpec

log = logging.getLogger(__name__)

IMPLS = ("reference", "blockwise", "pallas_tpu", "pallas_gpu")
# backend -> implementation for impl="auto"; update from scripts/bench_logprobs.py results
# (docs/benchmarks.md). cpu: blockwise, the only one that is neither [N, V]-sized nor interpreted
# there. gpu / tpu: the kernels by design, not yet measured on hardware; the first-use probe
# still falls back to blockwise (logged) if one fails to compile or disagrees with it.
AUTO_IMPL = {"cpu": "blockwise", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}
_KERNEL_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_logged: set = set()
_probed: dict = {}


def log_once(level, key, msg, *args):
  if key not in _logged:
    _logged.add(key)
    log.log(level, msg, *args)


def impl_module(name):
  if name == "blockwise":
    return blockwise
  return importlib.import_module(f"jpost.ops.{name}")


# ------------------------------------------------------------------------------- custom VJPs

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lp(h, w, labels, impl, spec):
  return _lp_fwd(h, w, labels, impl, spec)[0]


def _lp_fwd(h, w, labels, impl, spec):
  lse, zy, ent = impl_module(impl).lp_fwd(h, w, labels, spec)
  valid = labels >= 0
  outs = (jnp.where(valid, zy - lse, 0.0),)
  if spec.with_entropy:
    outs += (jnp.where(valid, ent, 0.0),)
  # Residuals: the inputs (already alive) and per-token float32 vectors only.
  return outs, (h, w, labels, lse, ent)


def _lp_bwd(impl, spec, res, cts):
  h, w, labels, lse, ent = res
  valid = labels >= 0
  g_lp = jnp.where(valid, cts[0], 0.0)
  g_ent = jnp.where(valid, cts[1], 0.0) if spec.with_entropy else None
  dh, dw = impl_module(impl).lp_bwd(h, w, labels, lse, ent, g_lp, g_ent, spec)
  return dh, dw, None


_lp.defvjp(_lp_fwd, _lp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _kl(h, w, h_ref, w_ref, labels, impl, spec):
  return _kl_fwd(h, w, h_ref, w_ref, labels, impl, spec)[0]


def _kl_fwd(h, w, h_ref, w_ref, labels, impl, spec):
  kl, lse, lse_ref = impl_module(impl).kl_fwd(h, w, h_ref, w_ref, labels, spec)
  return jnp.where(labels >= 0, kl, 0.0), (h, w, h_ref, w_ref, labels, lse, lse_ref)


def _kl_bwd(impl, spec, res, g):
  h, w, h_ref, w_ref, labels, lse, lse_ref = res
  g = jnp.where(labels >= 0, g, 0.0)
  dh, dw = impl_module(impl).kl_bwd(h, w, h_ref, w_ref, labels, lse, lse_ref, g, spec)
  # The reference model is a constant of the objective: None = zero cotangent, nothing allocated.
  del h_ref, w_ref
  return dh, dw, None, None, None


_kl.defvjp(_kl_fwd, _kl_bwd)


# --------------------------------------------------------------------- choosing an implementation

def _probe_inputs(kind, shapes, rng=None):
  """Arrays (rng given) or ShapeDtypeStructs of the call's shapes: h, w[, h_ref, w_ref], labels."""
  (n, d), (_, v), dtype = shapes
  if rng is None:
    mk = lambda s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    lab = jax.ShapeDtypeStruct((n,), jnp.int32)
  else:
    mk = lambda s: jnp.asarray(rng.normal(size=s) * 0.5, dtype)  # noqa: E731
    lab = jnp.asarray(np.where(rng.random(n) < 0.2, -1, rng.integers(0, v, n)), jnp.int32)
  return [mk((n, d)), mk((d, v))] + ([mk((n, d)), mk((d, v))] if kind == "kl" else []) + [lab]


@functools.lru_cache(maxsize=64)
def _value_and_grads(kind, impl, spec):
  """jit(f(h, w[, h_ref, w_ref], labels) -> (outputs, dh, dw)) through the custom VJP."""
  def f(*args):
    *hw, labels = args
    def outs(h, w):
      if kind == "kl":
        return (_kl(h, w, hw[2], hw[3], labels, impl, spec),)
      return _lp(h, w, labels, impl, spec)
    vals, vjp = jax.vjp(outs, hw[0], hw[1])
    cts = tuple(jnp.linspace(-1.0, 1.0, x.shape[0], dtype=x.dtype) for x in vals)
    return (vals, *vjp(cts))
  return jax.jit(f)


def _probe(kind, impl, spec, shapes):
  """None if the kernel compiles for these shapes and agrees with blockwise on a tiny problem,
  else the error text. Runs once per (kernel, config, shapes)."""
  key = (kind, impl, spec, shapes)
  if key not in _probed:
    try:
      _value_and_grads(kind, impl, spec).lower(*_probe_inputs(kind, shapes)).compile()
      # A smoke test for miscompilation (NaN, wrong layouts, dropped tiles), in bf16 with the
      # default tiles, against blockwise.
      small = OpSpec(spec.temperature, spec.softcap, spec.with_entropy,
                     BlockSizes(interpret=spec.interpret), spec.interpret)
      args = _probe_inputs(kind, ((19, 128), (128, 1000), jnp.dtype(jnp.bfloat16)),
                           np.random.default_rng(0))
      got = _value_and_grads(kind, impl, small)(*args)
      want = _value_and_grads(kind, "blockwise", small)(*args)
      # Values are float32-exact from bf16 inputs; gradients carry bf16 rounding of dz.
      for name, g, wnt, rel in zip(("values", "dh", "dw"), got, want, (1e-3, 5e-2, 5e-2)):
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(wnt)):
          x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
          err = float(np.max(np.abs(x - y))) if np.all(np.isfinite(x)) else float("inf")
          if err > rel * float(np.max(np.abs(y))):
            raise AssertionError(f"{name} differ from blockwise by {err:.3g} on a test problem")
      _probed[key] = None
    except Exception as e:  # noqa: BLE001 - any lowering/compile/numeric failure means fall back
      _probed[key] = f"{type(e).__name__}: {str(e)[:800]}"
  return _probed[key]


def resolve_impl(impl, spec, kind, h, w):
  backend = jax.default_backend()
  if impl == "auto":
    impl = AUTO_IMPL.get(backend, "blockwise")
    log_once(logging.INFO, ("auto", backend), "jpost.ops: impl='auto' on backend %r -> %r",
              backend, impl)
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected 'auto' or one of {IMPLS}")
  if impl not in _KERNEL_PLATFORM:
    return impl, spec
  interpret = spec.blocks.interpret
  if interpret is None:
    interpret = backend != _KERNEL_PLATFORM[impl]
    if interpret:
      log_once(logging.WARNING, ("interpret", impl, backend),
                "jpost.ops: %s on backend %r runs in Pallas interpret mode (slow; for tests)",
                impl, backend)
  spec = OpSpec(spec.temperature, spec.softcap, spec.with_entropy, spec.blocks, interpret)
  if interpret:
    return impl, spec
  error = _probe(kind, impl, spec, (tuple(h.shape), tuple(w.shape), jnp.dtype(h.dtype)))
  if error is not None:
    log_once(logging.WARNING, ("fallback", kind, impl, spec, h.shape, w.shape, h.dtype),
              "jpost.ops: %s failed for %s h%s w%s (%s); falling back to blockwise. Error: %s",
              impl, kind, tuple(h.shape), tuple(w.shape), h.dtype, error)
    return "blockwise", spec
  return impl, spec


def prepare_operands(h, w, labels):
  if h.ndim != 2 or w.ndim != 2 or labels.ndim != 1:
    raise ValueError(f"expected h [N, D], w [D, V], labels [N]; got {h.shape}, {w.shape}, "
                     f"{labels.shape}")
  if h.shape[1] != w.shape[0] or h.shape[0] != labels.shape[0]:
    raise ValueError(f"shape mismatch: h {h.shape}, w {w.shape}, labels {labels.shape}")
  # Kernels take one matmul dtype; the cast's transpose returns gradients in the input dtypes.
  dtype = jnp.result_type(h, w)
  return h.astype(dtype), w.astype(dtype), labels.astype(jnp.int32)


def make_spec(temperature, softcap, with_entropy, block_sizes):
  return OpSpec(temperature=float(temperature),
                softcap=None if softcap is None else float(softcap),
                with_entropy=bool(with_entropy), blocks=BlockSizes.of(block_sizes))


def token_logprobs(h, w, labels, *, temperature=1.0, softcap=None, with_entropy=False,
                   impl="auto", block_sizes=None):
  """Per-token log p(label) and (optionally) entropy of softmax(cap(h @ w) / temperature).

  h [N, D], w [D, V], labels [N] int (label < 0: masked, outputs 0 and no gradient; labels must
  be < V, which is not checked on device). Returns (logp [N] float32, entropy [N] float32 or
  None). Differentiable in h and w.
  """
  h, w, labels = prepare_operands(h, w, labels)
  spec = make_spec(temperature, softcap, with_entropy, block_sizes)
  if h.shape[0] == 0:   # no tiles to loop over; constant outputs have zero gradients
    empty = jnp.zeros((0,), jnp.float32)
    return empty, (empty if spec.with_entropy else None)
  impl, spec = resolve_impl(impl, spec, "lp", h, w)
  if impl == "reference":
    return reference.token_logprobs(h, w, labels, spec)
  outs = _lp(h, w, labels, impl, spec)
  return outs[0], (outs[1] if spec.with_entropy else None)


def token_kl(h, w, h_ref, w_ref, labels, *, temperature=1.0, softcap=None, impl="auto",
             block_sizes=None):
  """Per-token full-vocabulary KL(p_ref || p_theta) [N] float32; labels only mask (< 0 -> 0).

  The same temperature and soft-cap apply to both models. Gradients flow to h and w only.
  """
  h, w, labels = prepare_operands(h, w, labels)
  h_ref, w_ref, _ = prepare_operands(h_ref, w_ref, labels)
  if h_ref.shape != h.shape or w_ref.shape != w.shape:
    raise ValueError(f"reference shapes {h_ref.shape}, {w_ref.shape} differ from {h.shape}, "
                     f"{w.shape}")
  h_ref, w_ref = h_ref.astype(h.dtype), w_ref.astype(h.dtype)
  spec = make_spec(temperature, softcap, False, block_sizes)
  if h.shape[0] == 0:
    return jnp.zeros((0,), jnp.float32)
  impl, spec = resolve_impl(impl, spec, "kl", h, w)
  if impl == "reference":
    return reference.token_kl(h, w, h_ref, w_ref, labels, spec)
  return _kl(h, w, jax.lax.stop_gradient(h_ref), jax.lax.stop_gradient(w_ref), labels, impl,
             spec)
