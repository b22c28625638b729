"""The decoder: one Flax Linen implementation for Llama / Mistral / Qwen2 / Qwen3 / Gemma 2.

Parameters are a plain pytree (no boxing) laid out for sharding: projections keep heads as their
own axis ([D, H, K] rather than [D, H*K]) so `heads` can map to the tensor axis, and the layers
are stacked on a leading `layers` axis by `nn.scan`:

  embed/embedding [V, D]        layers/attn/{q,k,v}_proj/kernel [L, D, H|G, K]  (+ bias [L, H|G, K])
  final_norm/scale [D]          layers/attn/o_proj/kernel [L, H, K, D]
  lm_head/kernel [D, V]         layers/attn/{q,k}_norm/scale [L, K]             (Qwen3)
  (untied only)                 layers/mlp/{gate,up}_proj/kernel [L, D, F], down_proj [L, F, D]
                                layers/{pre,post}_{attn,mlp}_norm/scale [L, D]  (post_*: Gemma 2)

Einsum legend: B batch, T tokens, D d_model, H query heads, G kv heads, K head_dim, F mlp_dim,
V vocabulary, L layers.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpost.adapters import hook as adapter_hook
from jpost.models import attention
from jpost.models.config import ModelConfig

_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# Parameters up to this many elements draw their normal init as a flat vector: XLA:CPU compiles a
# flat threefry draw ~3x faster than a shaped one, and that compile dominates the start-up of small
# models and tests (the values are the same: partitionable threefry counts in row-major order).
# Larger parameters keep their shape so that a sharded init draws only each device's shard (a flat
# draw is materialised whole on every device).
_FLAT_INIT_MAX = 1 << 20


def normal_init(stddev):
  def init(key, shape, dtype=jnp.float32):
    size = int(np.prod(shape))
    draw_shape = (size,) if size <= _FLAT_INIT_MAX else shape
    return (stddev * jax.random.normal(key, draw_shape, jnp.float32)).reshape(shape).astype(dtype)
  return init


def _constrain(x, names):
  # A no-op unless logical axis rules (and a mesh) are in context: see jpost.train.sharding.
  return nn.with_logical_constraint(x, names)


def _param(module, name, shape, names, init, cfg):
  return module.param(name, nn.with_logical_partitioning(init, names), shape,
                      jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
  cfg: ModelConfig
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = _param(self, "scale", (x.shape[-1],), (self.axis_name,), init, cfg)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
    if cfg.norm_plus_one:
      # Gemma multiplies in float32 and casts afterwards; Llama casts first (transformers #29402).
      return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * x32.astype(x.dtype)


class Proj(nn.Module):
  """A linear map written as an einsum over named (shardable) axes, with an optional bias."""
  cfg: ModelConfig
  eqn: str
  shape: tuple
  names: tuple
  bias_shape: tuple | None = None
  bias_names: tuple | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    # LoRA / QLoRA hook (jpost/adapters/hook.py): a quantised base kernel and adapter factors
    # are extra leaves of this module's params; without them nothing changes.
    kernel = adapter_hook.quantized_kernel(self, self.shape, self.eqn, cfg.dtype)
    if kernel is None:
      kernel = _param(self, "kernel", self.shape, self.names,
                      normal_init(cfg.initializer_range), cfg)
    y = jnp.einsum(self.eqn, x, kernel.astype(cfg.dtype))
    if self.bias_shape is not None:
      bias = _param(self, "bias", self.bias_shape, self.bias_names, nn.initializers.zeros, cfg)
      y = y + bias.astype(cfg.dtype)
    return adapter_hook.with_lora(self, self.eqn, x, y, cfg.dtype)


class Attention(nn.Module):
  """Self-attention; `mode` (static) picks what it returns and which keys it sees:

  'apply'    keys = this call's tokens -> o
  'prefill'  the same, also returning this call's k, v (to be written into a KV cache)
  'decode'   keys = cache slots [0, S) with this call's k, v written at `index` first; query t
             sits at slot index + t -> (o, (k, v)). Masking by slot index (not position) is what
             `apply` does too, so left padding and sliding windows behave identically.
  """
  cfg: ModelConfig
  mode: str = "apply"

  @nn.compact
  def __call__(self, x_BTD, cos_sin, segment_ids_BT, is_sliding, cache=None):
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = lambda n, heads: dict(bias_shape=(n, k), bias_names=(heads, "head_dim")) \
        if cfg.qkv_bias else {}
    q = Proj(cfg, "btd,dhk->bthk", (d, h, k), ("embed", "heads", "head_dim"),
             **bias(h, "heads"), name="q_proj")(x_BTD)
    kk = Proj(cfg, "btd,dgk->btgk", (d, g, k), ("embed", "kv_heads", "head_dim"),
              **bias(g, "kv_heads"), name="k_proj")(x_BTD)
    v = Proj(cfg, "btd,dgk->btgk", (d, g, k), ("embed", "kv_heads", "head_dim"),
             **bias(g, "kv_heads"), name="v_proj")(x_BTD)
    if cfg.qk_norm:
      q = RMSNorm(cfg, axis_name="head_dim", name="q_norm")(q)
      kk = RMSNorm(cfg, axis_name="head_dim", name="k_norm")(kk)
    cos, sin = cos_sin
    q_BTHK = _constrain(attention.apply_rope(q, cos, sin),
                        ("batch", "length", "heads", "head_dim"))
    k_BTGK = _constrain(attention.apply_rope(kk, cos, sin),
                        ("batch", "length", "kv_heads", "head_dim"))
    v_BTGK = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))

    t = x_BTD.shape[1]
    if self.mode == "decode":
      k_cache_BSGK, v_cache_BSGK, kv_segment_BS, index = cache
      # The new keys as the cache will hold them (its dtype), so later steps see the same values.
      as_cached = lambda x: x.astype(k_cache_BSGK.dtype).astype(x.dtype)
      q_index_BT = jnp.broadcast_to(index + jnp.arange(t), segment_ids_BT.shape)
      kv_index_BS = jnp.broadcast_to(jnp.arange(k_cache_BSGK.shape[1]), kv_segment_BS.shape)
      # Cache slots before `index` (later ones are stale or empty), and the new tokens causally.
      cache_mask = attention.make_mask(
          segment_ids_BT, kv_segment_BS, q_index_BT, kv_index_BS,
          sliding_window=cfg.sliding_window, is_sliding=is_sliding) & (kv_index_BS < index)[
              :, None, None, :]
      new_mask = attention.make_mask(segment_ids_BT, segment_ids_BT, q_index_BT, q_index_BT,
                                     sliding_window=cfg.sliding_window, is_sliding=is_sliding)
      o_BTHK = attention.attend_cached(
          q_BTHK, k_cache_BSGK, v_cache_BSGK, cache_mask, as_cached(k_BTGK), as_cached(v_BTGK),
          new_mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
    else:
      q_index_BT = jnp.broadcast_to(jnp.arange(t), segment_ids_BT.shape)
      mask = attention.make_mask(segment_ids_BT, segment_ids_BT, q_index_BT, q_index_BT,
                                 sliding_window=cfg.sliding_window, is_sliding=is_sliding)
      o_BTHK = attention.attend(q_BTHK, k_BTGK, v_BTGK, mask, scale=cfg.attn_scale,
                                softcap=cfg.attn_softcap, impl=cfg.attention_impl,
                                segment_ids=(segment_ids_BT, segment_ids_BT),
                                sliding_window=cfg.sliding_window)
    o_BTHK = _constrain(o_BTHK, ("batch", "length", "heads", "head_dim"))
    o_BTD = Proj(cfg, "bthk,hkd->btd", (h, k, d), ("heads", "head_dim", "embed"),
                 name="o_proj")(o_BTHK)
    return o_BTD, (None if self.mode == "apply" else (k_BTGK, v_BTGK))


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    d, f = cfg.d_model, cfg.mlp_dim
    gate = Proj(cfg, "btd,df->btf", (d, f), ("embed", "mlp"), name="gate_proj")(x_BTD)
    up = Proj(cfg, "btd,df->btf", (d, f), ("embed", "mlp"), name="up_proj")(x_BTD)
    if cfg.activation == "silu":
      act = jax.nn.silu(gate)
    else:  # HF 'gelu_pytorch_tanh' is the tanh approximation
      act = jax.nn.gelu(gate, approximate=True)
    h_BTF = _constrain(act * up, ("batch", "length", "mlp"))
    return Proj(cfg, "btf,fd->btd", (f, d), ("mlp", "embed"), name="down_proj")(h_BTF)


class DecoderLayer(nn.Module):
  """One pre-norm block; the call signature is (carry, *broadcast, *scanned) for `nn.scan`.

  The scanned outputs are None ('apply') or this layer's new k, v ('prefill', 'decode'), which
  the scan stacks to [L, B, T, G, K]. In 'decode' the layer's cache slices k/v [B, S, G, K] are
  scanned inputs and `kv_context` = (cache segment ids [B, S], write index) is broadcast.
  """
  cfg: ModelConfig
  mode: str = "apply"

  @nn.compact
  def __call__(self, h_BTD, cos_sin, segment_ids_BT, kv_context, is_sliding, k_cache=None,
               v_cache=None):
    cfg = self.cfg
    cache = None if kv_context is None else (k_cache, v_cache, *kv_context)
    x = RMSNorm(cfg, name="pre_attn_norm")(h_BTD)
    x, new_kv = Attention(cfg, self.mode, name="attn")(x, cos_sin, segment_ids_BT, is_sliding,
                                                       cache)
    if cfg.sandwich_norms:
      x = RMSNorm(cfg, name="post_attn_norm")(x)
    h_BTD = h_BTD + x
    x = RMSNorm(cfg, name="pre_mlp_norm")(h_BTD)
    x = MLP(cfg, name="mlp")(x)
    if cfg.sandwich_norms:
      x = RMSNorm(cfg, name="post_mlp_norm")(x)
    h_BTD = _constrain(h_BTD + x, ("batch", "length", "activation_embed"))
    return h_BTD, new_kv


def _scanned_layers(cfg: ModelConfig, mode: str = "apply"):
  layer = DecoderLayer
  if cfg.remat != "none" and mode == "apply":
    # prevent_cse=False is safe (and faster) under scan, which already blocks the CSE it guards.
    # (Only training needs remat: the cached modes never take gradients.)
    layer = nn.remat(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
  cached = (0, 0) if mode == "decode" else ()
  return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0) + cached,
                 length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})


class Decoder(nn.Module):
  """'apply' -> h_BTD; 'prefill' / 'decode' -> (h_BTD, (k, v) [L, B, T, G, K] of these tokens).

  `cache` ('decode' only) = (k, v [L, B, S, G, K], kv segment ids [B, S] with this call's
  tokens already written, write index). The mode changes no parameter: one params tree serves all.
  """
  cfg: ModelConfig
  mode: str = "apply"

  @nn.compact
  def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None):
    cfg = self.cfg
    h_BTD = Embed(cfg, name="embed")(tokens_BT)
    if cfg.embed_scale:
      # transformers rounds sqrt(d) to the weight dtype, which there is the compute dtype; the
      # checkpoints were trained that way (Gemma 2 9B in bf16: sqrt(3584) = 59.87 -> 59.75).
      h_BTD = h_BTD * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
    h_BTD = _constrain(h_BTD, ("batch", "length", "activation_embed"))
    cos_sin = attention.rope_cos_sin(cfg, positions_BT)
    # The per-layer window flag is a scanned input, so Gemma 2's alternation runs one body.
    is_sliding_L = jnp.asarray(cfg.sliding_layers())
    layers = _scanned_layers(cfg, self.mode)(cfg, self.mode, name="layers")
    if self.mode == "decode":
      k_cache_L, v_cache_L, kv_segment_BS, index = cache
      h_BTD, new_kv = layers(h_BTD, cos_sin, segment_ids_BT, (kv_segment_BS, index),
                             is_sliding_L, k_cache_L, v_cache_L)
    else:
      h_BTD, new_kv = layers(h_BTD, cos_sin, segment_ids_BT, None, is_sliding_L)
    h_BTD = RMSNorm(cfg, name="final_norm")(h_BTD)
    if not cfg.tie_embeddings:
      # Created here so it lives in the params tree; used only through `unembedding`.
      LMHead(cfg, name="lm_head")()
    h_BTD = _constrain(h_BTD, ("batch", "length", "activation_embed"))
    return h_BTD if self.mode == "apply" else (h_BTD, new_kv)


class Embed(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT):
    cfg = self.cfg
    table = _param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                   normal_init(cfg.initializer_range), cfg)
    # Gather the fsdp-split embed dim first (as FSDP does for every weight): a lookup into a
    # table split on both dims makes XLA replicate the whole table and re-partition the result.
    table = _constrain(table, ("vocab", "activation_embed"))
    return jnp.take(table, tokens_BT, axis=0).astype(cfg.dtype)


class LMHead(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self):
    cfg = self.cfg
    return _param(self, "kernel", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                  normal_init(cfg.initializer_range), cfg)


# ---------------------------------------------------------------------------------------------
# The functional API (docs/architecture.md, "Models").
# ---------------------------------------------------------------------------------------------

def _current_rules():
  """The logical axis rules in context, as a hashable static argument.

  The jitted functions below are cached on their static arguments only, so the rules must be
  one: otherwise a trace made without rules would be reused inside a sharded context.
  """
  rules = nn.get_logical_axis_rules() or ()
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _dummy_inputs():
  tokens = jnp.zeros((1, 1), jnp.int32)
  return tokens, tokens, jnp.ones((1, 1), jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(cfg, rng, rules):
  with nn.logical_axis_rules(rules):
    return nn.unbox(Decoder(cfg).init(rng, *_dummy_inputs())["params"])


def init_params(cfg: ModelConfig, rng) -> dict:
  """Random parameters (plain pytree of arrays in cfg.param_dtype)."""
  return _init(cfg, rng, _current_rules())


@functools.lru_cache(maxsize=64)
def _abstract_boxed(cfg):
  return jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0),
                                                  *_dummy_inputs())["params"])


def param_logical_axes(cfg: ModelConfig) -> dict:
  """Same structure as the params; each leaf a tuple of logical axis names (one per dim)."""
  return jax.tree.map(lambda p: tuple(p.names), _abstract_boxed(cfg),
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def param_shapes(cfg: ModelConfig) -> dict:
  """Same structure as the params; ShapeDtypeStruct leaves (nothing is allocated)."""
  # No sharding constraints on unboxing: these are shapes, maybe inside a mesh context.
  return jax.tree.map(lambda p: p.unbox(apply_constraint=False), _abstract_boxed(cfg),
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


@functools.partial(jax.jit, static_argnums=(0, 5))
def _apply(cfg, params, tokens_BT, positions_BT, segment_ids_BT, rules):
  with nn.logical_axis_rules(rules):
    return Decoder(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)


def apply(cfg: ModelConfig, params, tokens_BT, positions_BT, segment_ids_BT):
  """Final-normed hidden states h_BTD in cfg.dtype.

  segment_ids 0 marks padding; a token attends causally to tokens of its own segment only, so a
  packed row behaves like its segments run separately (with positions restarting per segment).
  """
  return _apply(cfg, params, tokens_BT, positions_BT, segment_ids_BT, _current_rules())


def unembedding(cfg: ModelConfig, params):
  """w_DV in the compute dtype: the transposed embedding when tied, else the lm_head kernel."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T.astype(cfg.dtype)
  return params["lm_head"]["kernel"].astype(cfg.dtype)


# Leaves the decoder reads only through `.astype(cfg.dtype)` (matmul operands, and the embedding
# table, whose row lookup is exact): casting them once up front gives bit-identical outputs.
_COMPUTE_CAST_LEAVES = frozenset({"kernel", "bias", "embedding", "lora_a", "lora_b"})


def compute_weights(cfg: ModelConfig, params):
  """params with the matmul weights already in the compute dtype (norm scales, quantised codes and
  everything else untouched): same outputs, half the bytes per read of float32 master weights.

  For loops that read every weight once per step, such as the sampler's decode: inside the loop
  XLA keeps the float32 weights and converts them on every step (8 bytes of traffic per
  parameter instead of 2 for bfloat16), since hoisting the convert would hold a second copy.
  """
  dtype = jnp.dtype(cfg.dtype)

  def cast(path, x):
    name = getattr(path[-1], "key", None)
    if (name in _COMPUTE_CAST_LEAVES and jnp.issubdtype(x.dtype, jnp.floating)
        and jnp.dtype(x.dtype).itemsize > dtype.itemsize):
      return x.astype(dtype)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _logits(cfg, params, tokens_BT, positions_BT, segment_ids_BT, rules):
  with nn.logical_axis_rules(rules):
    h_BTD = Decoder(cfg).apply({"params": params}, tokens_BT, positions_BT, segment_ids_BT)
  z_BTV = jnp.einsum("btd,dv->btv", h_BTD, unembedding(cfg, params),
                     preferred_element_type=jnp.float32)
  if cfg.final_softcap is not None:
    z_BTV = jnp.tanh(z_BTV / cfg.final_softcap) * cfg.final_softcap
  return z_BTV


def logits(cfg: ModelConfig, params, tokens_BT, positions_BT=None, segment_ids_BT=None):
  """[B, T, V] float32 logits (soft-capped for Gemma 2). For tests and inspection only: losses
  use `apply` + `unembedding` with jpost.ops and never build this array."""
  tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32),
                                    tokens_BT.shape)
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones_like(tokens_BT)
  return _logits(cfg, params, tokens_BT, positions_BT, segment_ids_BT, _current_rules())


# ---------------------------------------------------------------------------------------------
# The KV cache (generation): prefill a prompt, then decode a few tokens at a time.
# ---------------------------------------------------------------------------------------------

# Logical axes of the cache entries: batch over data/fsdp and kv heads over tensor (like the k/v
# activations they store), so a sharded sampler never gathers the cache.
CACHE_AXES = {
    "k": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "v": ("layers", "batch", "length", "kv_heads", "head_dim"),
    "segment_ids": ("batch", "length"),
}


def _constrain_cache(cache):
  return {name: _constrain(x, CACHE_AXES[name]) for name, x in cache.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _init_cache(cfg, batch, max_len, dtype, rules):
  with nn.logical_axis_rules(rules):
    kv_shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return _constrain_cache({"k": jnp.zeros(kv_shape, dtype), "v": jnp.zeros(kv_shape, dtype),
                             "segment_ids": jnp.zeros((batch, max_len), jnp.int32)})


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """An empty, preallocated KV cache for `max_len` token slots per row (prompt + generation).

  {'k', 'v': [L, B, S, G, K] in `dtype` (default cfg.dtype), 'segment_ids': [B, S] int32}. The
  layers axis leads so the scanned decoder reads one layer's slice per scan step. Slots keep
  segment 0 until written; unwritten slots are also in the future of every query, so they are
  masked either way.
  """
  dtype = jnp.dtype(dtype or cfg.dtype)
  return _init_cache(cfg, int(batch), int(max_len), dtype, _current_rules())


def grow_cache(cache: dict, max_len: int) -> dict:
  """The cache with empty slots appended up to `max_len` (a copy: done between decode phases,
  not per step); written slots keep their contents."""
  extra = int(max_len) - cache["k"].shape[2]
  if extra < 0:
    raise ValueError(f"grow_cache: {cache['k'].shape[2]} slots cannot shrink to {max_len}")
  kv_pad = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
  with nn.logical_axis_rules(_current_rules()):
    return _constrain_cache({"k": jnp.pad(cache["k"], kv_pad), "v": jnp.pad(cache["v"], kv_pad),
                             "segment_ids": jnp.pad(cache["segment_ids"], ((0, 0), (0, extra)))})


def _write_cache(cache, k_LBTGK, v_LBTGK, segment_ids_BT, index):
  """Writes T new tokens' k, v and segment ids at slots [index, index + T) (in place under jit)."""
  dtype = cache["k"].dtype
  return _constrain_cache({
      "k": jax.lax.dynamic_update_slice(cache["k"], k_LBTGK.astype(dtype), (0, 0, index, 0, 0)),
      "v": jax.lax.dynamic_update_slice(cache["v"], v_LBTGK.astype(dtype), (0, 0, index, 0, 0)),
      "segment_ids": jax.lax.dynamic_update_slice(
          cache["segment_ids"], segment_ids_BT.astype(jnp.int32), (0, index)),
  })


@functools.partial(jax.jit, static_argnums=(0, 6))
def _prefill(cfg, params, tokens_BT, positions_BT, segment_ids_BT, cache, rules):
  with nn.logical_axis_rules(rules):
    # Plain self-attention over the prompt (T x T scores, not T x S): slots past T are empty.
    h_BTD, (k_LBTGK, v_LBTGK) = Decoder(cfg, "prefill").apply(
        {"params": params}, tokens_BT, positions_BT, segment_ids_BT)
    return h_BTD, _write_cache(cache, k_LBTGK, v_LBTGK, segment_ids_BT, 0)


def prefill(cfg: ModelConfig, params, tokens_BT, positions_BT, segment_ids_BT, cache):
  """Runs the prompt, writing its k, v at slots [0, T) -> (h_BTD final-normed, cache).

  h_BTD equals `apply` on the same inputs; the cache must have S >= T slots.
  """
  if tokens_BT.shape[1] > cache["k"].shape[2]:
    raise ValueError(f"prefill: {tokens_BT.shape[1]} prompt tokens do not fit a cache of "
                     f"{cache['k'].shape[2]} slots")
  return _prefill(cfg, params, tokens_BT, positions_BT, segment_ids_BT, cache, _current_rules())


@functools.partial(jax.jit, static_argnums=(0, 7))
def _decode_step(cfg, params, tokens_BT, positions_BT, segment_ids_BT, cache, index, rules):
  with nn.logical_axis_rules(rules):
    index = jnp.asarray(index, jnp.int32)
    kv_segment_BS = jax.lax.dynamic_update_slice(
        cache["segment_ids"], segment_ids_BT.astype(jnp.int32), (0, index))
    h_BTD, (k_LBTGK, v_LBTGK) = Decoder(cfg, "decode").apply(
        {"params": params}, tokens_BT, positions_BT, segment_ids_BT,
        (cache["k"], cache["v"], kv_segment_BS, index))
    return h_BTD, _write_cache(cache, k_LBTGK, v_LBTGK, segment_ids_BT, index)


def decode_step(cfg: ModelConfig, params, tokens_BT, positions_BT, cache, index,
                segment_ids_BT=None):
  """Runs T new tokens (usually T = 1) at slots [index, index + T) -> (h_BTD, cache).

  Each token attends to the cache slots <= its own that hold its segment (default 1), within
  the sliding window on windowed layers: exactly what `apply` on the whole sequence computes,
  where a token's slot plays the role of its index in the row. `index` may be traced (a
  while-loop counter); slots past index + T are never read, so the caller keeps them in bounds.
  """
  if segment_ids_BT is None:
    segment_ids_BT = jnp.ones(jnp.shape(tokens_BT), jnp.int32)
  return _decode_step(cfg, params, tokens_BT, positions_BT, segment_ids_BT, cache, index,
                      _current_rules())
