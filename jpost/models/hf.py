"""Hugging Face interop: `config.json` + `*.safetensors` <-> (ModelConfig, jpost params).

Loading reads memory-mapped tensors and converts each one lazily (reshape / transpose views) into
jpost's layout (heads as their own axis, layers stacked); with a mesh, every device's shard is
built by `jax.make_array_from_callback` from only the bytes it needs, so a model larger than one
host's accelerator memory never exists unsharded. Saving writes what
`transformers.AutoModelForCausalLM.from_pretrained` reads (v4-style config keys, which v5 also
accepts), tensor by tensor from a shard plan built from shapes alone (`save_hf_streamed`, which a
multi-host export feeds with one gathered tensor at a time), to a local or gs:// directory.
No pickle anywhere.
"""
import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from jpost.models import decoder
from jpost.models import safetensors_io
from jpost.models.config import FAMILIES, ModelConfig

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM"}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedConfig(ValueError):
  pass


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def _rope_fields(hf, where):
  """RoPE from either transformers v5 (`rope_parameters`) or v4 (`rope_theta` + `rope_scaling`)."""
  params = hf.get("rope_parameters")
  field = "rope_parameters"
  if params is None:
    params = dict(hf.get("rope_scaling") or {})
    field = "rope_scaling"
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
  if any(isinstance(v, dict) for v in params.values()):
    raise UnsupportedConfig(f"{where}: per-layer-type {field} is not supported")
  rope_type = params.get("rope_type", params.get("type", "default"))
  factor = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))
  if factor not in (None, 1, 1.0):
    raise UnsupportedConfig(f"{where}: partial_rotary_factor={factor} is not supported")
  out = dict(rope_theta=float(params.get("rope_theta") or 10000.0))
  if rope_type == "default":
    return out
  if rope_type != "llama3":
    raise UnsupportedConfig(f"{where}: {field}.rope_type={rope_type!r} is not supported "
                            "(supported: 'default', 'llama3')")
  return dict(out, rope_type="llama3", rope_factor=float(params["factor"]),
              rope_low_freq_factor=float(params["low_freq_factor"]),
              rope_high_freq_factor=float(params["high_freq_factor"]),
              rope_original_max_len=int(params.get("original_max_position_embeddings")
                                        or hf["max_position_embeddings"]))


def _sliding_fields(hf, family, num_layers, where):
  window = hf.get("sliding_window")
  if family in ("llama",):
    return {}
  if family in ("qwen2", "qwen3"):
    if hf.get("use_sliding_window"):
      raise UnsupportedConfig(f"{where}: use_sliding_window=true is not supported for {family} "
                              "(its max_window_layers layout is not implemented)")
    return {}
  if family == "mistral":    # transformers applies Mistral's window to every layer
    return dict(sliding_window=window) if window else {}
  # gemma2: layer_types (default: sliding, full, sliding, ...) must be a pattern jpost can scan.
  layer_types = hf.get("layer_types") or [
      "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
  sliding = [t == "sliding_attention" for t in layer_types]
  if len(sliding) != num_layers or any(t not in ("sliding_attention", "full_attention")
                                       for t in layer_types):
    raise UnsupportedConfig(f"{where}: layer_types={layer_types} is not supported")
  if not any(sliding) or not window:
    return dict(sliding_window=None)
  for pattern in range(1, num_layers + 1):
    if sliding == [i % pattern == 0 for i in range(num_layers)]:
      return dict(sliding_window=int(window), sliding_window_pattern=pattern)
  raise UnsupportedConfig(f"{where}: layer_types={layer_types} is not a pattern jpost "
                          "supports (layer i sliding when i % p == 0)")


def config_from_hf(hf: dict, where: str = "config.json", *, dtype="float32") -> ModelConfig:
  """A transformers config dict -> ModelConfig; anything unsupported is an error naming it."""
  family = hf.get("model_type")
  if family not in FAMILIES:
    raise UnsupportedConfig(f"{where}: model_type={family!r} is not supported "
                            f"(supported: {', '.join(FAMILIES)})")
  try:
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    num_layers = int(hf["num_hidden_layers"])
    fields = dict(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=num_layers,
                  num_heads=heads, mlp_dim=int(hf["intermediate_size"]),
                  max_position_embeddings=int(hf.get("max_position_embeddings", 8192)))
  except KeyError as e:
    raise UnsupportedConfig(f"{where}: missing required field {e.args[0]!r}") from None
  fields.update(num_kv_heads=int(hf.get("num_key_value_heads") or heads),
                head_dim=int(hf.get("head_dim") or d // heads),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", family == "gemma2")),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
                initializer_range=float(hf.get("initializer_range", 0.02)))
  act_field = "hidden_activation" if family == "gemma2" and hf.get("hidden_activation") \
      else "hidden_act"
  act = hf.get(act_field, "gelu_pytorch_tanh" if family == "gemma2" else "silu")
  if act not in _ACTIVATIONS:
    raise UnsupportedConfig(f"{where}: {act_field}={act!r} is not supported "
                            f"(supported: {sorted(_ACTIVATIONS)})")
  for flag in ("attention_bias", "mlp_bias", "use_bidirectional_attention"):
    if hf.get(flag):
      raise UnsupportedConfig(f"{where}: {flag}=true is not supported for {family}")
  fields.update(_rope_fields(hf, where))
  fields.update(_sliding_fields(hf, family, num_layers, where))
  if family == "qwen2":
    fields.update(qkv_bias=True)          # Qwen2 always has q/k/v biases (no config field)
  if family == "qwen3":
    fields.update(qk_norm=True)
  if family == "gemma2":
    fields.update(norm_plus_one=True, sandwich_norms=True, embed_scale=True,
                  query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
                  attn_softcap=hf.get("attn_logit_softcapping"),
                  final_softcap=hf.get("final_logit_softcapping"))
  dtype = jnp.dtype(dtype).name
  return ModelConfig(name=hf.get("_name_or_path") or family, family=family,
                     activation=_ACTIVATIONS[act], dtype=dtype, param_dtype=dtype, **fields)


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> dict:
  """ModelConfig -> transformers config.json dict (v4 key names; v5 converts them on load)."""
  if cfg.embed_scale != (cfg.family == "gemma2") or cfg.norm_plus_one != (cfg.family == "gemma2"):
    raise UnsupportedConfig(f"ModelConfig {cfg.name!r}: Gemma-style norms/embedding scale only "
                            "exist in transformers' gemma2 family")
  if cfg.qkv_bias != (cfg.family == "qwen2") or cfg.qk_norm != (cfg.family == "qwen3"):
    raise UnsupportedConfig(f"ModelConfig {cfg.name!r}: qkv_bias / qk_norm do not match what "
                            f"transformers' {cfg.family} implements")
  hf = dict(architectures=[_ARCHITECTURES[cfg.family]], model_type=cfg.family,
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            hidden_act={"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.activation],
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
            initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id,
            eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple)
            else cfg.eos_token_id, pad_token_id=cfg.pad_token_id, use_cache=True,
            torch_dtype=dtype or cfg.param_dtype)
  hf["rope_scaling"] = None if cfg.rope_type == "default" else dict(
      rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len)
  sliding = cfg.sliding_layers()
  if cfg.family in ("llama", "qwen3"):
    hf.update(attention_bias=False)
  if cfg.family == "llama":
    hf.update(mlp_bias=False)
  if cfg.family in ("llama", "qwen2", "qwen3") and cfg.sliding_window is not None:
    raise UnsupportedConfig(f"ModelConfig {cfg.name!r}: transformers' {cfg.family} has no "
                            "sliding window layout matching jpost's")
  if cfg.family in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  if cfg.family == "mistral":
    if cfg.sliding_window is not None and not sliding.all():
      raise UnsupportedConfig(f"ModelConfig {cfg.name!r}: Mistral windows every layer")
    hf.update(sliding_window=cfg.sliding_window)
  if cfg.family == "gemma2":
    scalar = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
    hf.update(hidden_activation=hf["hidden_act"],   # transformers validates it as an int
              query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
              attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
              sliding_window=cfg.sliding_window or 4096, attention_bias=False,
              layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
  return hf


# ---------------------------------------------------------------------------------------------
# Tensor layout: HF name, and the (lazy, view-only) conversions to and from jpost's layout.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Tensor:
  path: tuple            # path in jpost's params
  hf_name: str           # '{i}' = layer index for stacked params
  to_jpost: Callable     # HF array -> jpost array view (per layer for stacked ones)
  to_hf: Callable

  @property
  def stacked(self):
    return "{i}" in self.hf_name


def _tensors(cfg: ModelConfig) -> list:
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda x: x
  transpose = lambda x: x.T

  def heads_out(n):   # nn.Linear weight [n * k, d] <-> [d, n, k]
    return (lambda w: w.reshape(n, k, d).transpose(2, 0, 1),
            lambda a: a.transpose(1, 2, 0).reshape(n * k, d))

  def heads_bias(n):  # [n * k] <-> [n, k]
    return (lambda b: b.reshape(n, k), lambda a: a.reshape(n * k))

  out = [_Tensor(("embed", "embedding"), "model.embed_tokens.weight", same, same),
         _Tensor(("final_norm", "scale"), "model.norm.weight", same, same)]
  if not cfg.tie_embeddings:
    out.append(_Tensor(("lm_head", "kernel"), "lm_head.weight", transpose, transpose))
  layer = "model.layers.{i}."
  for name, n in (("q", h), ("k", g), ("v", g)):
    out.append(_Tensor(("layers", "attn", f"{name}_proj", "kernel"),
                       layer + f"self_attn.{name}_proj.weight", *heads_out(n)))
    if cfg.qkv_bias:
      out.append(_Tensor(("layers", "attn", f"{name}_proj", "bias"),
                         layer + f"self_attn.{name}_proj.bias", *heads_bias(n)))
  out.append(_Tensor(("layers", "attn", "o_proj", "kernel"), layer + "self_attn.o_proj.weight",
                     lambda w: w.reshape(d, h, k).transpose(1, 2, 0),
                     lambda a: a.transpose(2, 0, 1).reshape(d, h * k)))
  if cfg.qk_norm:
    for name in ("q_norm", "k_norm"):
      out.append(_Tensor(("layers", "attn", name, "scale"), layer + f"self_attn.{name}.weight",
                         same, same))
  for name in ("gate_proj", "up_proj", "down_proj"):
    out.append(_Tensor(("layers", "mlp", name, "kernel"), layer + f"mlp.{name}.weight",
                       transpose, transpose))
  # Llama's `post_attention_layernorm` is the norm *before* the MLP; Gemma 2 names both sides.
  norms = {"pre_attn_norm": "input_layernorm"}
  if cfg.sandwich_norms:
    norms.update(post_attn_norm="post_attention_layernorm",
                 pre_mlp_norm="pre_feedforward_layernorm",
                 post_mlp_norm="post_feedforward_layernorm")
  else:
    norms.update(pre_mlp_norm="post_attention_layernorm")
  for ours, theirs in norms.items():
    out.append(_Tensor(("layers", ours, "scale"), layer + f"{theirs}.weight", same, same))
  return out


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

class _Checkpoint:
  """Name -> lazy array over one or several (index.json) safetensors files."""

  def __init__(self, path):
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    elif os.path.exists(single):
      weight_map = {n: "model.safetensors" for n in safetensors_io.SafetensorsFile(single).keys()}
    else:
      raise FileNotFoundError(f"{path}: neither model.safetensors nor "
                              "model.safetensors.index.json found")
    self.dir = path
    self.weight_map = weight_map
    self._files = {}

  def file_of(self, name):
    return os.path.join(self.dir, self.weight_map[name])

  def get(self, name):
    fname = self.weight_map[name]
    if fname not in self._files:
      self._files[fname] = safetensors_io.SafetensorsFile(os.path.join(self.dir, fname))
    return self._files[fname].get(name)


def _read_config(path):
  cfg_path = os.path.join(path, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found")
  with open(cfg_path) as f:
    return json.load(f), cfg_path


def load_hf(path: str, *, dtype=jnp.float32, mesh=None, rules=None, config_only: bool = False):
  """Reads a local HF model directory -> (ModelConfig, params) with params in `dtype`.

  `cfg.dtype` and `cfg.param_dtype` are set to `dtype`; replace them for mixed precision. With a
  mesh, params are placed straight into the NamedShardings that `rules` (default:
  `jpost.train.sharding.default_rules()`) give their logical axes. `config_only=True` returns
  (cfg, None) without touching the weights.
  """
  hf, cfg_path = _read_config(path)
  cfg = config_from_hf(hf, cfg_path, dtype=dtype)
  if not hf.get("_name_or_path"):
    cfg = dataclasses.replace(cfg, name=os.path.basename(os.path.normpath(path)))
  if config_only:
    return cfg, None
  ckpt = _Checkpoint(path)
  # Checkpoints saved from the bare model class have no 'model.' prefix.
  prefix_fix = "model.embed_tokens.weight" not in ckpt.weight_map \
      and "embed_tokens.weight" in ckpt.weight_map
  np_dtype = jnp.dtype(dtype)
  shapes = decoder.param_shapes(cfg)
  shardings = None
  if mesh is not None:
    from jpost.train import sharding as jsharding   # train depends on models, not the reverse
    rules = jsharding.default_rules() if rules is None else rules
    shardings = jsharding.logical_to_sharding(decoder.param_logical_axes(cfg), mesh, rules,
                                              shapes=shapes)
  used, params = set(), {}
  for t in _tensors(cfg):
    shape = tuple(_get(shapes, t.path).shape)
    names = [t.hf_name.format(i=i) for i in range(cfg.num_layers)] if t.stacked else [t.hf_name]
    if prefix_fix:
      names = [n.removeprefix("model.") for n in names]
    views = []
    for n in names:
      if n not in ckpt.weight_map:
        raise ValueError(f"{path}: tensor {n!r} is missing from the checkpoint "
                         f"(needed for model_type={cfg.family} as described by {cfg_path})")
      raw = ckpt.get(n)
      want = shape[1:] if t.stacked else shape
      try:
        view = t.to_jpost(raw)
      except ValueError:   # the reshape into heads failed: same report as a wrong shape
        view = None
      if view is None or view.shape != want:
        raise ValueError(f"{ckpt.file_of(n)}: tensor {n!r} has shape {raw.shape}, which does "
                         f"not fit {cfg_path} (expected {want} in jpost layout)")
      views.append(view)
      used.add(n)

    def read(index, views=views, stacked=t.stacked):
      # Only the requested block is copied out of the memory map (and only its layers).
      index = tuple(index) + (slice(None),) * (len(shape) - len(index))
      if stacked:
        layers = range(len(views))[index[0]]
        return np.stack([views[i][index[1:]] for i in layers]).astype(np_dtype)
      return np.asarray(views[0][index]).astype(np_dtype)

    if shardings is None:
      value = jnp.asarray(read(()))
    else:
      value = jax.make_array_from_callback(shape, _get(shardings, t.path), read)
    _set(params, t.path, value)
  _check_unused(ckpt, used, cfg, path)
  return cfg, params


def _check_unused(ckpt, used, cfg, path):
  ignorable = lambda n: n.endswith("rotary_emb.inv_freq") or (
      cfg.tie_embeddings and n == "lm_head.weight")   # some exporters keep the tied copy
  extra = sorted(n for n in ckpt.weight_map if n not in used and not ignorable(n))
  if extra:
    raise ValueError(f"{path}: {len(extra)} checkpoint tensors are not used by jpost's "
                     f"{cfg.family} model (e.g. {extra[:3]} in {ckpt.file_of(extra[0])}); "
                     "the config declares a simpler architecture than the weights")


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_hf(cfg: ModelConfig, params, path: str, *, max_shard_bytes: int = 5 * 2**30,
            generation_config: bool = True, dtype=None) -> None:
  """Writes config.json + model.safetensors (or shards + index.json) that transformers loads.

  Tensors keep the dtype of `params` (or are cast to `dtype`, e.g. bfloat16, one at a time).
  `params` must be addressable from this process (numpy, or one process's jax arrays: each layer
  of each tensor is fetched on its own); `jpost.train.export` streams a multi-host run's
  params. `path` may be local or an object store (gs://..., through `etils.epath`).
  """
  def tensor(path_, layer):
    value = _get(params, path_)
    value = np.asarray(value if layer is None else value[layer])
    return value if dtype is None else value.astype(jnp.dtype(dtype))

  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype or x.dtype)), params)
  save_hf_streamed(cfg, abstract, tensor, path, max_shard_bytes=max_shard_bytes,
                   generation_config=generation_config)


def hf_shards(cfg: ModelConfig, abstract, max_shard_bytes: int) -> list:
  """The HF tensors of params shaped like `abstract` (ShapeDtypeStruct leaves) split into shards:
  [{hf name: (_Tensor, layer index or None, hf shape, dtype)}], in order.

  Tensor by tensor, each stacked one layer by layer (the order `load_hf` reads them in), a new
  shard starting when the next tensor would pass `max_shard_bytes`; a larger tensor gets a shard
  of its own. Needs only shapes, so every process of a multi-host export knows the plan.
  """
  entries = []
  for t in _tensors(cfg):
    leaf = _get(abstract, t.path)
    one = jax.ShapeDtypeStruct(leaf.shape[1:] if t.stacked else leaf.shape, leaf.dtype)
    hf_shape = jax.eval_shape(t.to_hf, one).shape
    if t.stacked:
      entries += [(t.hf_name.format(i=i), (t, i, hf_shape, leaf.dtype))
                  for i in range(cfg.num_layers)]
    else:
      entries.append((t.hf_name, (t, None, hf_shape, leaf.dtype)))
  shards, current, size = [], {}, 0
  for name, entry in entries:
    nbytes = int(np.prod(entry[2], dtype=np.int64)) * jnp.dtype(entry[3]).itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = entry
    size += nbytes
  shards.append(current)
  return shards


def shard_bytes(shard: dict) -> int:
  return sum(int(np.prod(s, dtype=np.int64)) * jnp.dtype(d).itemsize for _, _, s, d in
             shard.values())


def save_hf_streamed(cfg: ModelConfig, abstract, get_tensor: Callable, path: str, *,
                     write: bool = True, max_shard_bytes: int = 5 * 2**30,
                     generation_config: bool = True) -> None:
  """`save_hf` from a tensor source: `get_tensor(jpost path, layer or None)` -> one layer of a
  stacked param (the whole param when None) in jpost's layout, as a numpy array.

  `abstract` gives every param's shape and dtype (ShapeDtypeStruct leaves), so the shard plan
  (`hf_shards`) and each file's header exist before any tensor does; tensors are then fetched in
  each file's data order and written as they come, so the host holds about one tensor, never a
  shard or the model. `write=False` (the other processes of a multi-host export) fetches the
  same tensors in the same order (`get_tensor` may be a collective) and writes nothing.
  """
  out = epath.Path(path)
  if write:
    out.mkdir(parents=True, exist_ok=True)
  shards = hf_shards(cfg, abstract, max_shard_bytes)
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  meta = {"format": "pt"}   # transformers refuses safetensors files without a known format
  for fname, shard in zip(names, shards):
    def fetch(name, shard=shard):
      t, layer, _, _ = shard[name]
      return t.to_hf(get_tensor(t.path, layer))
    if write:
      safetensors_io.write_streamed(os.fspath(out / fname),
                                    {n: (d, s) for n, (_, _, s, d) in shard.items()}, fetch, meta)
    else:
      for name in sorted(shard):
        get_tensor(shard[name][0].path, shard[name][1])
  if not write:
    return
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(shard_bytes(s) for s in shards)},
             "weight_map": {n: fname for fname, s in zip(names, shards) for n in s}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  dtype = str(jnp.dtype(abstract["embed"]["embedding"].dtype))
  (out / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2, sort_keys=True))
  if generation_config:
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                             ("eos_token_id", list(cfg.eos_token_id)
                              if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True))
