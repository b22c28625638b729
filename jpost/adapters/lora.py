"""LoRA as a params transform: adapters beside a frozen (optionally quantised) base.

  params = {"lm": base decoder params (frozen; targeted kernels int8 / NF4 under QLoRA),
            "lora": {"layers": {"attn": {"q_proj": {"a": [L, r, *in], "b": [L, *out, r]}, ...},
                                "mlp": {...}}},
            optional heads}

Targets are named as in Hugging Face / PEFT (`q_proj`, ..., `down_proj`, or `all-linear`). The
factors keep the kernel's own dims ([*in] = (embed,) or o_proj's (heads, head_dim); [*out]
likewise), so they shard with the same logical axes as the kernel they adapt, and A / B reshape
per layer to PEFT's `lora_A.weight [r, in]` / `lora_B.weight [out, r]` (jpost.adapters.peft).

The forward never builds a merged weight: `attach` puts each layer's A, (alpha / r) B (and, in
training, a dropout key) next to the kernel, `nn.scan` slices them per layer, and the projection
adds `dropout(x) A^T B^T` (jpost.adapters.hook). Only A and B get gradients and optimiser state
(jpost.train.step.trainable); the base is read, never differentiated. The reference model of
DPO / KTO / KL objectives is the same base with the adapters off (`params['lm']`), so no second
copy of the weights exists. `merge` folds the adapters into plain float kernels for export.
"""
import dataclasses
import difflib

import jax
import jax.numpy as jnp
import numpy as np

from jpost import models
from jpost.adapters import quant

# HF module name -> (jpost path of the projection, leading input dims of its kernel, HF module
# path under `model.layers.{i}`).
TARGETS = {
    "q_proj": (("layers", "attn", "q_proj"), 1, "self_attn.q_proj"),
    "k_proj": (("layers", "attn", "k_proj"), 1, "self_attn.k_proj"),
    "v_proj": (("layers", "attn", "v_proj"), 1, "self_attn.v_proj"),
    "o_proj": (("layers", "attn", "o_proj"), 2, "self_attn.o_proj"),
    "gate_proj": (("layers", "mlp", "gate_proj"), 1, "mlp.gate_proj"),
    "up_proj": (("layers", "mlp", "up_proj"), 1, "mlp.up_proj"),
    "down_proj": (("layers", "mlp", "down_proj"), 1, "mlp.down_proj"),
}
QUANTIZE = ("none",) + quant.KINDS
ADAPTER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_config() -> dict:
  """The `lora` config section (jpost/train/config.py)."""
  return dict(
      rank=0,                   # 0 = off (full fine-tuning); r > 0 trains only rank-r adapters
      alpha=16.0,               # adapter output scaled by alpha / rank (PEFT's lora_alpha)
      dropout=0.0,              # on the adapter input, training steps only
      targets="all-linear",     # HF module names 'q_proj,v_proj,...' or 'all-linear'
      quantize="none",          # none | int8 | nf4: store the frozen base targets quantised (QLoRA)
      double_quant=False,       # nf4 only: 8-bit absmax, blocks of 256 (bnb_4bit_use_double_quant)
      adapter_dtype="auto",     # auto = bfloat16 with a quantised base, else model.param_dtype
  )


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static description of the adapters (hashable: closed over by jit through ForwardSpec)."""
  rank: int
  alpha: float
  dropout: float = 0.0
  targets: tuple = tuple(TARGETS)
  quantize: str = "none"
  adapter_dtype: str = "float32"
  double_quant: bool = False

  def __post_init__(self):
    if self.double_quant and self.quantize != "nf4":
      raise ValueError(f"lora.double_quant=True needs lora.quantize='nf4' (got "
                       f"{self.quantize!r})")

  @property
  def stored_kind(self) -> str:
    """The base's stored form (jpost.adapters.quant.LEAVES), or 'none'."""
    return "nf4_dq" if self.double_quant else self.quantize

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def parse_targets(text: str) -> tuple:
  """'q_proj, v_proj' | 'all-linear' -> ('q_proj', 'v_proj') in TARGETS order; unknown fail."""
  names = [t.strip() for t in str(text).split(",") if t.strip()]
  if names == ["all-linear"]:
    return tuple(TARGETS)
  unknown = [n for n in names if n not in TARGETS]
  if unknown or not names:
    hints = {n: difflib.get_close_matches(n, list(TARGETS) + ["all-linear"], n=1) for n in unknown}
    raise ValueError(f"lora.targets={text!r}: " + (
        "; ".join(f"unknown module {n!r}" + (f" (did you mean {h[0]!r}?)" if h else "")
                  for n, h in hints.items()) if unknown else "no module named")
        + f"; expected 'all-linear' or a comma list of {', '.join(TARGETS)}")
  return tuple(n for n in TARGETS if n in names)


def spec_from_config(section, param_dtype: str = "float32") -> LoraSpec | None:
  """The `lora` config section -> LoraSpec, or None when rank == 0 (adapters off).

  Every problem is reported at once; settings that only make sense with adapters are refused
  with rank 0 instead of being ignored.
  """
  get = lambda k: section[k]
  rank, problems = get("rank"), []
  # Absent from the config.json of runs older than the switch: they ran without it.
  double_quant = section["double_quant"] if "double_quant" in section else False
  if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
    raise ValueError(f"lora.rank={rank!r}: expected an integer >= 0 (0 = off)")
  if rank == 0:
    if get("quantize") != "none" or get("dropout") or double_quant:
      raise ValueError(f"lora.quantize={get('quantize')!r} / lora.dropout={get('dropout')!r} / "
                       f"lora.double_quant={double_quant!r} need adapters: set lora.rank > 0")
    return None
  alpha, dropout = float(get("alpha")), float(get("dropout"))
  if not alpha > 0:
    problems.append(f"lora.alpha={alpha} must be > 0")
  if not 0.0 <= dropout < 1.0:
    problems.append(f"lora.dropout={dropout} must be in [0, 1)")
  if get("quantize") not in QUANTIZE:
    problems.append(f"lora.quantize={get('quantize')!r}: expected one of {QUANTIZE}")
  if not isinstance(double_quant, (bool, np.bool_)):
    problems.append(f"lora.double_quant={double_quant!r}: expected True or False")
  elif double_quant and get("quantize") != "nf4":
    problems.append(f"lora.double_quant=True quantises the NF4 block absmax values: it needs "
                    f"lora.quantize='nf4' (got {get('quantize')!r})")
  if get("adapter_dtype") not in ADAPTER_DTYPES:
    problems.append(f"lora.adapter_dtype={get('adapter_dtype')!r}: expected one of "
                    f"{ADAPTER_DTYPES}")
  try:
    targets = parse_targets(get("targets"))
  except ValueError as e:
    problems.append(str(e))
  if problems:
    raise ValueError("invalid lora config: " + "; ".join(problems))
  dtype = get("adapter_dtype")
  if dtype == "auto":
    dtype = "bfloat16" if get("quantize") != "none" else jnp.dtype(param_dtype).name
  return LoraSpec(rank=int(rank), alpha=alpha, dropout=dropout, targets=targets,
                  quantize=get("quantize"), adapter_dtype=dtype,
                  double_quant=bool(double_quant))


# ---------------------------------------------------------------------------------------------
# Tree helpers (the adapters tree mirrors the decoder's nested dicts)
# ---------------------------------------------------------------------------------------------

def get_path(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _replace(tree, path, value):
  """A copy of the nested dict `tree` with `tree[path] = value` (other branches shared)."""
  if not path:
    return value
  return dict(tree, **{path[0]: _replace(tree[path[0]], path[1:], value)})


def set_path(tree, path, value):
  """Like `_replace`, creating missing levels (builds the adapters tree)."""
  if len(path) == 1:
    return dict(tree, **{path[0]: value})
  return dict(tree, **{path[0]: set_path(tree.get(path[0], {}), path[1:], value)})


def kernel_dims(model_cfg, name):
  """(L, in dims, out dims) of a target's kernel."""
  path, n_in, _ = TARGETS[name]
  shape = tuple(get_path(models.param_shapes(model_cfg), path)["kernel"].shape)
  return shape[0], shape[1:1 + n_in], shape[1 + n_in:]


def _kernel_axes(model_cfg, name):
  path, n_in, _ = TARGETS[name]
  axes = get_path(models.param_logical_axes(model_cfg), path)["kernel"]
  return axes[1:1 + n_in], axes[1 + n_in:]


# ---------------------------------------------------------------------------------------------
# Adapters: init, shapes, axes
# ---------------------------------------------------------------------------------------------

def init_adapters(spec: LoraSpec, model_cfg, key) -> dict:
  """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming-uniform default), B = 0: the adapted model
  starts exactly at the base."""
  dims = [kernel_dims(model_cfg, name) for name in spec.targets]
  sizes = [layers * spec.rank * int(np.prod(ins)) for layers, ins, _ in dims]
  # One flat draw for every A: XLA:CPU compiles each threefry draw separately and slowly. (A
  # flat draw is materialised whole on each device; the A factors are small: r x in per layer.)
  flat = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
  out, start = {}, 0
  for name, (layers, ins, outs), size in zip(spec.targets, dims, sizes):
    a = flat[start:start + size].reshape((layers, spec.rank) + ins) / np.sqrt(np.prod(ins))
    start += size
    out = set_path(out, TARGETS[name][0], {
        "a": a.astype(spec.adapter_dtype),
        "b": jnp.zeros((layers,) + outs + (spec.rank,), spec.adapter_dtype)})
  return out


def adapter_axes(spec: LoraSpec, model_cfg) -> dict:
  """Logical axes of the adapters: A ('layers', 'lora_rank', *kernel in axes), B ('layers',
  *kernel out axes, 'lora_rank'). 'lora_rank' has no mesh rule, so it is replicated."""
  out = {}
  for name in spec.targets:
    ins, outs = _kernel_axes(model_cfg, name)
    out = set_path(out, TARGETS[name][0], {"a": ("layers", "lora_rank") + tuple(ins),
                                           "b": ("layers",) + tuple(outs) + ("lora_rank",)})
  return out


def count_adapter_params(spec: LoraSpec, model_cfg) -> int:
  total = 0
  for name in spec.targets:
    layers, ins, outs = kernel_dims(model_cfg, name)
    total += layers * spec.rank * (int(np.prod(ins)) + int(np.prod(outs)))
  return total


# ---------------------------------------------------------------------------------------------
# The quantised base (QLoRA)
# ---------------------------------------------------------------------------------------------

def quantize_base(lm, spec: LoraSpec, model_cfg) -> dict:
  """The base with every targeted kernel replaced by its int8 / NF4 (maybe double-quantised)
  form (others unchanged)."""
  if spec.quantize == "none":
    return lm
  for name in spec.targets:
    path, n_in, _ = TARGETS[name]
    node = get_path(lm, path)
    if "kernel" not in node:
      raise ValueError(f"quantize_base: {'/'.join(path)} has no float kernel (already "
                       f"quantised: {sorted(node)})")
    stored = quant.quantize(spec.stored_kind, node["kernel"], n_in)
    lm = _replace(lm, path, {**{k: v for k, v in node.items() if k != "kernel"}, **stored})
  return lm


def base_axes(lm_axes, spec: LoraSpec) -> dict:
  """Logical axes of the (maybe quantised) base, from the decoder's `param_logical_axes`."""
  if spec.quantize == "none":
    return lm_axes
  for name in spec.targets:
    path, n_in, _ = TARGETS[name]
    node = get_path(lm_axes, path)
    stored = quant.logical_axes(spec.stored_kind, node["kernel"], n_in)
    lm_axes = _replace(lm_axes, path,
                       {**{k: v for k, v in node.items() if k != "kernel"}, **stored})
  return lm_axes


def dequantized_base(lm, model_cfg, dtype=jnp.float32) -> dict:
  """A plain float base (every kernel a `kernel`) from a maybe-quantised one."""
  shapes = models.param_shapes(model_cfg)
  for name, (path, n_in, _) in TARGETS.items():
    node = get_path(lm, path)
    kind = quant.stored_kind(node)
    if kind is None:
      continue
    shape = tuple(get_path(shapes, path)["kernel"].shape)
    stored = {k: node[k] for k in quant.LEAVES[kind]}
    kernel = quant.dequantize(kind, stored, shape, n_in, dtype)
    lm = _replace(lm, path, {**{k: v for k, v in node.items() if k not in stored},
                             "kernel": kernel})
  return lm


# ---------------------------------------------------------------------------------------------
# Forward and merge
# ---------------------------------------------------------------------------------------------

def attach(lm, adapters, spec: LoraSpec, rng=None) -> dict:
  """The decoder params the model runs with: the base plus, at each target, this step's
  `lora_a`, `lora_b` (pre-scaled by alpha / r) and, when `rng` is given and dropout > 0, one
  dropout key per layer (jpost.adapters.hook). `rng` = None is evaluation: no dropout."""
  for i, name in enumerate(spec.targets):
    path = TARGETS[name][0]
    ab = get_path(adapters, path)
    node = dict(get_path(lm, path), lora_a=ab["a"],
                lora_b=ab["b"].astype(jnp.float32) * spec.scale)
    if rng is not None and spec.dropout > 0:
      layers = ab["a"].shape[0]
      node["lora_dropout_key"] = jax.random.split(jax.random.fold_in(rng, i), layers)
      node["lora_dropout_rate"] = jnp.full((layers,), spec.dropout, jnp.float32)
    lm = _replace(lm, path, node)
  return lm


def delta(ab, spec: LoraSpec, n_in: int, dtype=jnp.float32):
  """(alpha / r) A^T B^T in the kernel's layout [L, *in, *out] (all layers)."""
  a = ab["a"].astype(jnp.float32)
  b = ab["b"].astype(jnp.float32)
  layers, rank, ins = a.shape[0], a.shape[1], a.shape[2:]
  outs = b.shape[1:-1]
  a2 = a.reshape(layers, rank, -1)
  b2 = b.reshape(layers, -1, rank)
  d = jnp.einsum("lri,lor->lio", a2, b2) * spec.scale
  return d.reshape((layers,) + tuple(ins) + tuple(outs)).astype(dtype)


def merge(lm, adapters, spec: LoraSpec, model_cfg, dtype=jnp.float32) -> dict:
  """Plain decoder params with W + (alpha / r) A^T B^T in every target (base dequantised
  first): what `scripts/export_hf.py --adapters=merged` writes."""
  lm = dequantized_base(lm, model_cfg, dtype)
  for name in spec.targets:
    path, n_in, _ = TARGETS[name]
    node = get_path(lm, path)
    kernel = node["kernel"].astype(jnp.float32) + delta(get_path(adapters, path), spec, n_in)
    lm = _replace(lm, path, dict(node, kernel=kernel.astype(dtype)))
  return lm


def export_lm(params, lora_section, model_cfg) -> dict:
  """The decoder params to write as a plain HF model: `params['lm']`, or, for a LoRA run, the
  base with the adapters merged in (in the base's float dtype)."""
  if "lora" not in params:
    return params["lm"]
  spec = spec_from_config(lora_section, model_cfg.param_dtype)
  if spec is None:
    raise ValueError("params hold LoRA adapters but the config has lora.rank = 0")
  return merge(params["lm"], params["lora"], spec, model_cfg, jnp.dtype(model_cfg.param_dtype))


# ---------------------------------------------------------------------------------------------
# The training loop's set-up
# ---------------------------------------------------------------------------------------------

def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def add_adapters(params, axes, spec: LoraSpec, model_cfg, mesh, rules, key):
  """{'lm': float base, heads...} -> (params with a quantised base if asked and fresh adapters,
  their logical axes, their shardings). The new arrays are created in their shardings."""
  from jpost.train import sharding   # train depends on adapters, not the reverse at import time
  new_axes = dict(axes, lm=base_axes(axes["lm"], spec), lora=adapter_axes(spec, model_cfg))

  def build(lm, key):
    return {"lm": quantize_base(lm, spec, model_cfg), "lora": init_adapters(spec, model_cfg, key)}

  part_axes = {"lm": new_axes["lm"], "lora": new_axes["lora"]}
  abstract = jax.eval_shape(build, params["lm"], key)
  out_shardings = sharding.logical_to_sharding(part_axes, mesh, rules, shapes=abstract)
  if spec.quantize == "none":
    # Keep the base buffers as they are (no copy); only the adapters are created.
    built = {"lm": params["lm"],
             "lora": jax.jit(lambda k: init_adapters(spec, model_cfg, k),
                             out_shardings=out_shardings["lora"])(key)}
  else:
    built = jax.jit(build, out_shardings=out_shardings)(params["lm"], key)
  before = tree_bytes(params["lm"])
  new_params = dict(params, **built)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), new_params)
  shardings = sharding.logical_to_sharding(new_axes, mesh, rules, shapes=shapes)
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(models.param_shapes(model_cfg)))
  n_lora = count_adapter_params(spec, model_cfg)
  print(f"LoRA r={spec.rank} alpha={spec.alpha:g} on {','.join(spec.targets)}: {n_lora / 1e6:.3f}M "
        f"trainable params ({100 * n_lora / n_base:.2f}% of {n_base / 1e6:.2f}M) in "
        f"{spec.adapter_dtype}; frozen base {before / 2**20:.1f} MiB"
        + (f" -> {tree_bytes(built['lm']) / 2**20:.1f} MiB ({spec.stored_kind})"
           if spec.quantize != "none" else ""), flush=True)
  return new_params, new_axes, shardings
