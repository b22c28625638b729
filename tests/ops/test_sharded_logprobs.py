"""token_logprobs / token_kl under shard_map (jpost/ops/sharded.py) equal the unsharded op.

Runs on the 8 fake CPU devices of tests/conftest.py. The sharded op runs the same blockwise
implementation per shard, so against unsharded blockwise the only differences are float32
rounding: the cross-shard log-sum-exp (one more exp / log per token), and the summation order of
dh (over vocabulary shards) and dw (over token shards). Measured: <= 5e-7 of the largest value of
each output; the tests allow 1e-6 (a wrong shift of the labels, a lost shard or a dropped psum
gives errors of order 1). KL is checked against float64 instead (see its test).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jpost.ops import lm_head, logprobs, sharded
from jpost.train import sharding

N, D = 96, 32
BLOCKS = dict(token=32, vocab=96)     # ragged vocabulary tiles inside every shard
RTOL = 1e-6


def _problem(v, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(N, D)).astype(np.float32)
  w = (0.5 * rng.normal(size=(D, v))).astype(np.float32)
  labels = rng.integers(0, v, N).astype(np.int32)
  labels[::7] = -1                                   # masked tokens
  g_lp, g_ent = rng.normal(size=(2, N)).astype(np.float32)
  return h, w, labels, g_lp, g_ent


def _values_and_grads(fn, h, w, g_lp, g_ent):
  """(logp, entropy, dh, dw) of loss = sum(g_lp * logp + g_ent * entropy)."""
  def loss(h, w):
    lp, ent = fn(h, w)
    return jnp.sum(g_lp * lp) + jnp.sum(g_ent * ent), (lp, ent)
  (_, (lp, ent)), (dh, dw) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(h, w)
  return [np.asarray(x) for x in (lp, ent, dh, dw)]


def _assert_close(got, want, names):
  for name, a, b in zip(names, got, want):
    err = float(np.max(np.abs(a - b)))
    scale = float(np.max(np.abs(b)))
    print(f"  {name}: max|diff| {err:.2e} ({err / scale:.1e} of max {scale:.3g})")
    assert err <= RTOL * scale, f"{name}: {err:.3g} > {RTOL} * {scale:.3g}"


@pytest.mark.parametrize("mesh_shape,token_axes,vocab_axes,embed_axes,kw", [
    # every axis in use; dw comes back reduce-scattered over fsdp; Gemma-style soft-cap
    (dict(data=2, fsdp=2, tensor=2), ("data", "fsdp"), ("tensor",), ("fsdp",),
     dict(temperature=0.7, softcap=5.0)),
    # the vocabulary over all 8 devices, tokens replicated
    (dict(data=1, fsdp=1, tensor=8), (), ("tensor",), (), dict(temperature=1.0)),
    # the vocabulary over two mesh axes at once (shard order = axis_index order)
    (dict(data=2, fsdp=2, tensor=2), ("data",), ("fsdp", "tensor"), ("data",),
     dict(temperature=1.3)),
], ids=["data2-fsdp2-tensor2", "tensor8", "vocab-over-fsdp-and-tensor"])
def test_sharded_logprobs_equal_unsharded(mesh_shape, token_axes, vocab_axes, embed_axes, kw):
  h, w, labels, g_lp, g_ent = _problem(1024)
  kw = dict(kw, with_entropy=True, impl="blockwise", block_sizes=BLOCKS)
  want = _values_and_grads(lambda h, w: logprobs.token_logprobs(h, w, labels, **kw),
                           h, w, g_lp, g_ent)
  layout = sharded.Layout(sharding.make_mesh(**mesh_shape), token_axes, vocab_axes, embed_axes)
  got = _values_and_grads(lambda h, w: sharded.token_logprobs(h, w, labels, layout, **kw),
                          h, w, g_lp, g_ent)
  _assert_close(got, want, ("logp", "entropy", "dh", "dw"))
  masked = labels < 0
  assert np.all(got[0][masked] == 0) and np.all(got[1][masked] == 0)
  assert np.all(got[2][masked] == 0)                 # no gradient through masked tokens


@pytest.mark.slow   # Pallas interpret mode: ~7 s of CPU per kernel on 2 cores
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_sharded_kernels_equal_unsharded_kernels(impl):
  """Each shard runs the kernel's own lp_fwd / lp_bwd (interpret mode on CPU)."""
  h, w, labels, g_lp, g_ent = _problem(1024)
  kw = dict(temperature=0.7, softcap=5.0, with_entropy=True, impl=impl,
            block_sizes=dict(token=16, vocab=128, interpret=True))
  want = _values_and_grads(lambda h, w: logprobs.token_logprobs(h, w, labels, **kw),
                           h, w, g_lp, g_ent)
  layout = sharded.Layout(sharding.make_mesh(data=2, fsdp=2, tensor=2), ("data", "fsdp"),
                          ("tensor",), ("fsdp",))
  got = _values_and_grads(lambda h, w: sharded.token_logprobs(h, w, labels, layout, **kw),
                          h, w, g_lp, g_ent)
  _assert_close(got, want, ("logp", "entropy", "dh", "dw"))


def test_sharded_kl_is_as_accurate_as_unsharded():
  """KL(ref || policy) from per-shard KLs and masses; gradients reach h and w only.

  Checked against float64, like the unsharded op: KL is a difference of O(|z|) terms (|z| <=
  softcap / T = 7.1 here), so its float32 error is absolute, about eps32 * max|z| = 8.5e-7 per
  computed KL (unsharded: 4.9e-7; sharded, two per-shard KLs then combined: 9.3e-7). Its
  gradient g (p - q) loses digits where p and q are close: the float32 rounding of each lse
  (~eps32 * |lse| relative on p and q) leaves both ops 1.2e-6 (dh) and 1.5e-6 (dw) of the
  largest entry away from float64. Bounds: 1.7e-6 (2 shards x 8.5e-7) and 2e-6.
  """
  h, w, labels, g, _ = _problem(1024, seed=1)
  rng = np.random.default_rng(2)
  h_ref = (h + 0.3 * rng.normal(size=h.shape)).astype(np.float32)
  w_ref = (w + 0.1 * rng.normal(size=w.shape)).astype(np.float32)
  temperature, softcap = 0.7, 5.0
  kw = dict(temperature=temperature, softcap=softcap, impl="blockwise", block_sizes=BLOCKS)
  layout = sharded.Layout(sharding.make_mesh(data=2, fsdp=2, tensor=2), ("data", "fsdp"),
                          ("tensor",), ("fsdp",))

  def run(kl_fn):
    def loss(h, w, h_ref, w_ref):
      kl = kl_fn(h, w, h_ref, w_ref)
      return jnp.sum(g * kl), kl
    (_, kl), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
        h, w, h_ref, w_ref)
    return [np.asarray(x) for x in (kl, *grads)]

  # float64: z = softcap tanh(a / softcap) / T; d kl / d z = p - q.
  valid = labels >= 0
  tanh = lambda h, w: np.tanh(h.astype(np.float64) @ w / softcap)
  log_softmax = lambda z: z - z.max(1, keepdims=True) - np.log(
      np.sum(np.exp(z - z.max(1, keepdims=True)), 1, keepdims=True))
  th = tanh(h, w)
  logp = log_softmax(softcap * th / temperature)
  logq = log_softmax(softcap * tanh(h_ref, w_ref) / temperature)
  kl = np.where(valid, np.sum(np.exp(logq) * (logq - logp), 1), 0.0)
  da = np.where(valid, g, 0.0)[:, None] * (np.exp(logp) - np.exp(logq)) / temperature * (
      1 - th ** 2)
  truth = (kl, da @ w.T.astype(np.float64), h.T.astype(np.float64) @ da)

  for name, kl_fn in (("unsharded", lambda *a: logprobs.token_kl(*a, labels, **kw)),
                      ("sharded", lambda *a: sharded.token_kl(*a, labels, layout, **kw))):
    got = run(kl_fn)
    kl_err = float(np.max(np.abs(got[0] - truth[0])))
    print(f"  {name} kl: max|error| {kl_err:.2e} (max kl {np.max(truth[0]):.3g})")
    assert kl_err <= 1.7e-6
    for grad_name, a, b in zip(("dh", "dw"), got[1:3], truth[1:]):
      err = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
      print(f"  {name} {grad_name}: relative error {err:.2e}")
      assert err <= 2e-6
    assert not np.any(got[3]) and not np.any(got[4])   # the reference gets no gradient
    assert np.all(got[0][~valid] == 0)


def test_context_layout_follows_mesh_and_rules():
  rules = sharding.default_rules()
  assert sharded.context_layout(N, D, 1024) is None                     # no mesh
  with sharding.axis_rules(rules, sharding.make_mesh(devices=jax.devices()[:1])):
    assert sharded.context_layout(N, D, 1024) is None                   # one device
  with sharding.axis_rules(rules, sharding.make_mesh(data=2, fsdp=2, tensor=2)):
    layout = sharded.context_layout(N, D, 1024)
    assert (layout.token_axes, layout.vocab_axes, layout.embed_axes) == (
        ("data", "fsdp"), ("tensor",), ("fsdp",))
    assert sharded.context_layout(N, D, 1024, impl="reference") is None
    # 1001 columns do not split over tensor=2: tensor splits the tokens instead.
    layout = sharded.context_layout(N, D, 1001)
    assert (layout.token_axes, layout.vocab_axes) == (("data", "fsdp", "tensor"), ())
    layout = sharded.context_layout(6, D, 1024)                         # 6 tokens: data only
    assert (layout.token_axes, layout.vocab_axes) == (("data",), ("tensor",))
    assert sharded.context_layout(0, D, 1024) is None
  with sharding.axis_rules(sharding.default_rules({"vocab": None}),
                           sharding.make_mesh(data=1, fsdp=8, tensor=1)):
    layout = sharded.context_layout(N, D, 1024)
    assert (layout.token_axes, layout.vocab_axes, layout.embed_axes) == (("fsdp",), (), ("fsdp",))
  with sharding.axis_rules(sharding.default_rules({"vocab": "fsdp"}),
                           sharding.make_mesh(data=1, fsdp=8, tensor=1)):
    with pytest.raises(ValueError, match="same mesh axis"):
      sharded.context_layout(N, D, 1024)


def test_explicit_layout_rejects_what_it_cannot_split():
  h, w, labels, _, _ = _problem(1002)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  with pytest.raises(ValueError, match="vocabulary 1002 does not split"):
    sharded.token_logprobs(h, w, labels, sharded.Layout(mesh, ("data",), ("tensor",)))
  with pytest.raises(ValueError, match="share a mesh axis"):
    sharded.token_logprobs(h, w, labels, sharded.Layout(mesh, ("tensor",), ("tensor",)))
  with pytest.raises(ValueError, match="must be token axes"):
    sharded.token_logprobs(h, w, labels, sharded.Layout(mesh, ("data",), (), ("tensor",)))
  with pytest.raises(ValueError, match="no sharded form"):
    sharded.token_logprobs(h, w, labels, sharded.Layout(mesh, ("data",), ()), impl="reference")


def test_lm_head_under_a_mesh_with_an_unsplittable_vocabulary():
  """V = 1002 on tensor=4: the LM head splits tokens over (data, tensor) instead."""
  h, w, labels, g_lp, g_ent = _problem(1002, seed=3)
  targets = np.maximum(labels, 0).reshape(4, 24)
  mask = (labels >= 0).astype(np.float32).reshape(4, 24)
  kw = dict(with_entropy=True, impl="blockwise", block_sizes=BLOCKS, softcap=4.0)
  head = lambda h, w: lm_head.sequence_logprobs(h.reshape(4, 24, D), w, targets, mask, **kw)
  flat = lambda h, w: tuple(x.reshape(N) for x in head(h, w))
  want = _values_and_grads(flat, h, w, g_lp, g_ent)
  with sharding.axis_rules(sharding.default_rules(), sharding.make_mesh(data=2, fsdp=1,
                                                                          tensor=4)):
    assert sharded.context_layout(N, D, 1002).token_axes == ("data", "tensor")
    got = _values_and_grads(flat, h, w, g_lp, g_ent)
  _assert_close(got, want, ("logp", "entropy", "dh", "dw"))


def _collectives(hlo_text, op):
  """(result shape, line) of every `op` (all-gather, all-reduce, ...) in compiled HLO text."""
  out = []
  for line in hlo_text.splitlines():
    m = re.search(r"= (\w+\[[\d,]*\])\S* " + op + r"(-start)?\(", line)
    if m:
      out.append((m.group(1), line.strip()))
  return out


def test_compiled_step_never_gathers_the_vocabulary():
  """The LM head's forward + backward under fsdp=4 x tensor=2 at sizes where tiles loop.

  GSPMD on the unsharded op all-gathers h over the data axes and w over `tensor` (it cannot
  partition the tile loops); the shard_map version gathers only w's D rows over fsdp (the usual
  FSDP weight gather) and reduces per-token vectors, dh and dw.
  """
  n, d, v = 2048, 64, 4096
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  place = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
  rng = np.random.default_rng(0)
  h = place(rng.normal(size=(8, n // 8, d)).astype(np.float32), ("data", "fsdp"))
  w = place(rng.normal(size=(d, v)).astype(np.float32), "fsdp", "tensor")
  targets = place(rng.integers(0, v, (8, n // 8)).astype(np.int32), ("data", "fsdp"))
  mask = place(np.ones((8, n // 8), np.float32), ("data", "fsdp"))

  def loss(h, w):
    lp, ent = lm_head.sequence_logprobs(h, w, targets, mask, with_entropy=True,
                                        impl="blockwise")
    return jnp.sum(lp) + jnp.sum(ent)

  with sharding.axis_rules(sharding.default_rules(), mesh):
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(h, w).compile().as_text()
  gathers = _collectives(hlo, "all-gather")
  print("\n".join(line[:140] for _, line in gathers))
  # Exactly w's FSDP gather: [D, V / tensor], nothing of V columns or of all N tokens.
  assert [shape for shape, _ in gathers] == [f"f32[{d},{v // 2}]"]
  reduces = [shape for shape, _ in _collectives(hlo, "all-reduce")]
  assert not any(str(v) in s for s in reduces), reduces
  assert [s for s, _ in _collectives(hlo, "reduce-scatter")] == [f"f32[{d // 4},{v // 2}]"]
