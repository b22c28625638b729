"""Execution options of the model config: precision policy (model.dtype / model.param_dtype),
remat policies and the attention implementation (model.attention)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jpost import data as jdata
from jpost import models
from jpost.losses import registry
from jpost.models import attention
from jpost.train import config as tconfig
from jpost.train import forward, optim
from jpost.train import loop as train_loop
from jpost.train import sharding
from jpost.train import step as tstep

import helpers

TINY = models.get_model_config("tiny", dtype="float32")
T = 16
# XLA:CPU's legacy fusion code generation at LLVM -O0: these tests check values, not speed, and
# it compiles a train step about 5x faster (2 s instead of 12 s of CPU time for the tiny step).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


@functools.lru_cache(maxsize=None)
def _sft_batch():
  """[1, 4, T] SFT micro-batch: two packed rows and two single rows with right padding."""
  rng = np.random.default_rng(0)
  seqs = [jdata.encode.Seq(rng.integers(1, 512, n).astype(np.int32),
                           np.r_[np.zeros(n // 2, np.int8), np.ones(n - n // 2, np.int8)], n // 2)
          for n in (16, 9, 12, 5)]
  return {k: v[None] for k, v in jdata.batching.unpacked_batch([[s] for s in seqs], T).items()}


def _float_dtypes(tree):
  return {x.dtype.name for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


# ---------------------------------------------------------------------------------------------
# Precision policy
# ---------------------------------------------------------------------------------------------

def test_bf16_compute_gives_a_loss_close_to_f32_compute():
  """The accelerator policy (bf16 compute on float32 weights) against float32 compute, same
  weights and batch. (That its train steps keep float32 params and Adam moments is checked on
  real bench_step steps in tests/test_bench.py.)

  Tolerance: one bf16 rounding, 2^-9 relative. bf16 keeps 8 significant bits, so every matmul
  input and activation is rounded with a relative error <= 2^-9; the loss is a float32
  log-softmax and a mean over the batch's loss tokens, which averages those independent
  roundings instead of accumulating them. Measured 2.3e-4 here, with random weights of scale
  0.2 (O(1) logits, not the near-uniform ones of the default init); a broken policy (a float16
  overflow, a lost cast, bf16 log-softmax) is off by far more.
  """
  params = {"lm": helpers.random_params(TINY)}
  batch = jax.tree.map(lambda x: x[0], tstep.with_global_denominators(_sft_batch(), "examples"))
  objective = registry.get_objective("nll")

  def losses(params):
    out = {}
    for dtype in ("float32", "bfloat16"):
      spec = forward.ForwardSpec(model_cfg=dataclasses.replace(TINY, dtype=dtype),
                                 impl="blockwise")
      out[dtype] = objective.fn(forward.compute_logps(spec, params, None, batch), batch,
                                objective.default_config())[0]
    return out

  got = {k: float(v) for k, v in _compiled(losses, params)(params).items()}
  rel = abs(got["bfloat16"] - got["float32"]) / got["float32"]
  print(f"loss f32 {got['float32']:.6f}, bf16 compute {got['bfloat16']:.6f}, "
        f"relative difference {rel:.2e}")
  assert 0 < rel < 2.0 ** -9   # > 0: bf16 really ran


def test_param_dtype_sets_master_weights_and_optimizer_state():
  """bf16 params carry bf16 Adam moments (before and after an update), and an update smaller than half a weight's bf16
  spacing is rounded away; float32 master weights keep it (why float32 is the default)."""
  p32 = {"w": jnp.asarray(np.random.default_rng(0).normal(0.0, 0.05, (64, 64)), jnp.float32)}
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  opt_cfg = optim.default_config()
  opt_cfg.update(lr=1e-5, schedule="constant")
  optimizer = optim.make_optimizer(opt_cfg, 10)
  grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(64, 64)), jnp.float32)}
  moved = {}
  for name, params in (("float32", p32), ("bfloat16", p16)):
    state = tstep.init_state(params, optimizer, 0)
    assert _float_dtypes(state.opt_state) == {name}
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.dtype(name)
    # float32 gradients do not promote the moments: the state keeps its dtypes (one compile of
    # the step, and a resumed state equal to the saved one).
    assert jax.tree.map(lambda x: x.dtype, opt_state) == jax.tree.map(lambda x: x.dtype,
                                                                       state.opt_state)
    big = np.abs(np.asarray(params["w"], np.float32)) > 0.02   # bf16 spacing >= 1.2e-4 here
    moved[name] = np.mean((np.asarray(new["w"]) != np.asarray(params["w"]))[big])
  # Adam's first step is ~lr = 1e-5 per weight (clipping scales gradients, not Adam's step).
  assert moved["float32"] == 1.0 and moved["bfloat16"] == 0.0


def test_model_config_rejects_unknown_dtypes():
  with pytest.raises(ValueError, match="dtype='bf16'"):
    models.get_model_config("tiny", dtype="bf16")
  with pytest.raises(ValueError, match="param_dtype='float64'"):
    models.get_model_config("tiny", param_dtype="float64")


# ---------------------------------------------------------------------------------------------
# Remat
# ---------------------------------------------------------------------------------------------

def test_remat_policies_give_the_gradients_of_no_remat():
  """Recomputation runs the same float32 ops: value and gradients agree to rounding. Remat wraps
  the scanned layers only, so the loss is a random linear function of the final hidden states
  (what any loss back-propagates into them). All four policies compile as one program."""
  params = helpers.random_params(TINY)
  batch = jax.tree.map(lambda x: x[0], _sft_batch())
  cotangent = np.random.default_rng(1).normal(size=batch["tokens"].shape + (TINY.d_model,))

  def loss(params, policy):
    cfg = dataclasses.replace(TINY, remat=policy)
    h = models.apply(cfg, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    return jnp.sum(h * cotangent)

  policies = models.config.REMAT_POLICIES
  all_grads = lambda p: [jax.value_and_grad(loss)(p, policy) for policy in policies]
  grads = _compiled(all_grads, params)(params)
  (base_loss, base), others = grads[0], grads[1:]
  assert policies[0] == "none"
  for policy, (value, g) in zip(policies[1:], others):
    np.testing.assert_allclose(value, base_loss, rtol=1e-6, err_msg=policy)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(base)):
      # Float32 rounding where the recomputed forward is fused differently from the saved one:
      # <= 4.7e-7 of the leaf's largest gradient with FAST_COMPILE (bit-identical with XLA's
      # default CPU codegen). A wrong residual or a missing recompute is off by O(1).
      scale = np.abs(np.asarray(b)).max()
      np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * scale, err_msg=policy)
  # Every weight the trunk uses gets a gradient (lm_head is only read by the unembedding).
  trunk = {k: v for k, v in base.items() if k != "lm_head"}
  assert all(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(trunk))


# ---------------------------------------------------------------------------------------------
# Attention implementation
# ---------------------------------------------------------------------------------------------

def test_xla_attention_equals_auto_in_the_model():
  """Packed segments and padding through the whole model: the explicit path and
  jax.nn.dot_product_attention give the same logits."""
  batch = jax.tree.map(lambda x: x[0], _sft_batch())
  params = helpers.random_params(TINY)

  def both(params):
    return {impl: models.logits(dataclasses.replace(TINY, attention_impl=impl), params,
                                batch["tokens"], batch["positions"], batch["segment_ids"])
            for impl in ("auto", "xla")}

  logits = jax.tree.map(np.asarray, _compiled(both, params)(params))
  np.testing.assert_allclose(logits["xla"], logits["auto"], atol=2e-5, rtol=0)
  assert np.abs(logits["auto"]).max() > 1.0   # O(1) logits: not a vacuous comparison


def test_kernel_attention_off_its_backend_is_a_clear_error(monkeypatch):
  q = jnp.ones((1, 4, 4, 8), jnp.bfloat16)
  kv = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  mask = jnp.ones((1, 1, 4, 4), bool)
  seg = (jnp.ones((1, 4), jnp.int32),) * 2
  with pytest.raises(ValueError, match="'cudnn' needs a GPU backend, but jax runs on 'cpu'"):
    attention.attend(q, kv, kv, mask, scale=0.5, impl="cudnn")
  with pytest.raises(ValueError, match="'splash' needs a TPU backend, but jax runs on 'cpu'"):
    attention.attend(q, kv, kv, mask, scale=0.5, impl="splash", segment_ids=seg)
  with pytest.raises(ValueError, match="expected one of"):
    attention.attend(q, kv, kv, mask, scale=0.5, impl="flash")
  # Through the model: the config's choice reaches attend.
  tokens = np.ones((1, 4), np.int32)
  for impl, backend in (("cudnn", "GPU"), ("splash", "TPU")):
    cfg = dataclasses.replace(TINY, dtype="bfloat16", attention_impl=impl)
    with pytest.raises(ValueError, match=f"needs a {backend} backend"):
      models.apply(cfg, models.param_shapes(cfg), tokens, tokens, tokens)
  # What cuDNN cannot do fails before reaching it (the backend check faked to pass).
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="needs bfloat16 or float16 compute.*float32"):
    attention.attend(q.astype(jnp.float32), kv, kv, mask, scale=0.5, impl="cudnn")
  with pytest.raises(ValueError, match="cannot soft-cap"):
    attention.attend(q, kv, kv, mask, scale=0.5, softcap=50.0, impl="cudnn")
  # Combinations the config can tell are unsupported fail when the config is built.
  with pytest.raises(ValueError, match="'cudnn' cannot soft-cap"):
    models.get_model_config("gemma2_2b", attention_impl="cudnn")
  with pytest.raises(ValueError, match="'splash' is not wired for sliding-window"):
    models.get_model_config("mistral_7b", attention_impl="splash")
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    models.get_model_config("tiny", attention_impl="flash")


def test_auto_attention_picks_the_backend_kernel_where_it_applies():
  choose = lambda **kw: attention.auto_impl(**{
      **dict(backend="gpu", dtype=jnp.bfloat16, softcap=None, sliding_window=None, head_dim=128,
             seq_len=2048, compute_capability="9.0"), **kw})
  assert choose() == "cudnn"
  assert choose(sliding_window=4096) == "cudnn"             # the window is in the mask
  assert choose(dtype=jnp.float32) is None                  # cuDNN flash: bf16 / fp16 only
  assert choose(softcap=50.0) is None                       # Gemma 2: XLA's explicit path
  assert choose(seq_len=2047) is None                       # cuDNN needs even lengths with a mask
  assert choose(head_dim=256) == "cudnn"                    # Hopper: up to 256
  assert choose(head_dim=256, compute_capability="8.0") is None
  assert choose(head_dim=100) is None                       # not a multiple of 8
  assert choose(backend="tpu") == "splash"
  assert choose(backend="tpu", softcap=50.0) == "splash"    # splash soft-caps itself
  assert choose(backend="tpu", sliding_window=4096) is None
  assert choose(backend="cpu") is None


def test_auto_attention_routes_to_cudnn_on_a_gpu(monkeypatch):
  """With the backend faked to 'gpu', 'auto' asks jax for cuDNN exactly where auto_impl says so
  (the call is recorded, not run: there is no GPU here)."""
  calls = []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, **kw: calls.append(kw.get("implementation")) or q)
  kv = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  mask = jnp.ones((1, 1, 4, 4), bool)
  attention.attend(jnp.ones((1, 4, 4, 8), jnp.bfloat16), kv, kv, mask, scale=0.5)
  attention.attend(jnp.ones((1, 4, 4, 8), jnp.float32), kv.astype(jnp.float32),
                   kv.astype(jnp.float32), mask, scale=0.5)
  assert calls == ["cudnn", None]
  # A KV-cache decode step (one query against a longer cache) never takes a kernel.
  attention.attend(jnp.ones((1, 1, 4, 8), jnp.bfloat16), kv, kv, mask[:, :, :1], scale=0.5)
  assert calls == ["cudnn", None, None]


def test_splash_kernel_matches_xla_attention_in_interpret_mode():
  """The splash wiring (scale, heads-first layout, GQA, segment ids, soft-cap, padding to a
  multiple of 128, shard_map over a data x fsdp x tensor mesh) against the explicit path, values
  and gradients, with the Pallas kernel interpreted on CPU."""
  rng = np.random.default_rng(0)
  b, t, h, g, k = 4, 100, 4, 2, 16
  q = jnp.asarray(rng.normal(size=(b, t, h, k)), jnp.float32)
  kk, v = (jnp.asarray(rng.normal(size=(b, t, g, k)), jnp.float32) for _ in range(2))
  seg = np.ones((b, t), np.int32)
  seg[0, 80:] = 0            # right padding
  seg[1, 40:] = 2            # two packed segments
  seg = jnp.asarray(seg)
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  mask = attention.make_mask(seg, seg, idx, idx)

  def outputs(fn):
    def run(q, kk, v):
      loss = lambda q, kk, v: jnp.sum(jnp.sin(fn(q, kk, v)))
      return fn(q, kk, v), jax.grad(loss, (0, 1, 2))(q, kk, v)
    return run

  splash = lambda q, kk, v: attention.splash_attention(q, kk, v, seg, scale=0.3, softcap=5.0,
                                                       interpret=True)
  xla = lambda q, kk, v: attention.attend(q, kk, v, mask, scale=0.3, softcap=5.0, impl="xla")
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with sharding.axis_rules(sharding.default_rules(), mesh):
    lowered = jax.jit(outputs(splash)).lower(q, kk, v)
    got = lowered.compile(compiler_options=FAST_COMPILE)(q, kk, v)
  assert "manual_computation" in lowered.as_text()    # it ran per shard
  want = _compiled(outputs(xla), q, kk, v)(q, kk, v)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, w, atol=2e-5, rtol=0)


def test_train_config_attention_and_precision_reach_the_model_config():
  cfg = tconfig.base_config("nll")
  assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.attention) == (
      "float32", "float32", "auto")
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.model.update(dtype="bfloat16", remat="dots", attention="xla")
  model_cfg = train_loop._model_config(cfg, jdata.make_tokenizer(cfg.data))
  assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.remat, model_cfg.attention_impl) == (
      "bfloat16", "float32", "dots", "xla")
