"""Where a model named on a command line lives, and loading it.

A model path is one of:
  - `hf:DIR`: a Hugging Face directory (config.json + *.safetensors);
  - a jpost workdir, its `checkpoints/` directory or one step directory under it (recognised by
    the workdir's `model_config.json`); `ckpt:` prefix optional;
  - a directory with an HF config.json and no jpost model_config.json (an HF directory without
    the prefix).

The scripts (sample.py, merge.py) share this so that they accept the same paths.
"""
import dataclasses
import json
import os


@dataclasses.dataclass(frozen=True)
class ModelSource:
  kind: str                 # 'jpost' | 'hf'
  path: str                 # the directory to load from (expanded, without prefix)
  workdir: str | None       # the jpost workdir (holds model_config.json), None for HF
  spec: str                 # as given

  def run_config(self) -> dict:
    """The jpost run's config.json ({} for HF directories or a workdir without one)."""
    if self.workdir is None:
      return {}
    path = os.path.join(self.workdir, "config.json")
    if not os.path.exists(path):
      return {}
    with open(path) as f:
      return json.load(f)


def jpost_workdir(path: str) -> str | None:
  """The workdir holding model_config.json for a workdir, its checkpoints/ directory or a step
  directory under it; else None."""
  path = os.path.abspath(path)
  for d in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.exists(os.path.join(d, "model_config.json")):
      return d
  return None


def resolve(spec: str) -> ModelSource:
  """A model path (see the module docstring) -> ModelSource. FileNotFoundError names `spec`."""
  if spec.startswith("hf:"):
    path, forced = os.path.expanduser(spec[3:]), "hf"
  elif spec.startswith("ckpt:"):
    path, forced = os.path.expanduser(spec[5:]), "jpost"
  else:
    path, forced = os.path.expanduser(spec), None
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{spec}: no such directory")
  workdir = None if forced == "hf" else jpost_workdir(path)
  if workdir is not None:
    return ModelSource("jpost", path, workdir, spec)
  if forced == "jpost":
    raise FileNotFoundError(f"{spec}: not a jpost workdir (no model_config.json here or above)")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"{spec}: neither a jpost workdir (no model_config.json) nor a "
                            "Hugging Face directory (no config.json)")
  return ModelSource("hf", path, None, spec)


def load(source: ModelSource, dtype: str | None = None):
  """-> (ModelConfig, params): the full params tree of a jpost checkpoint ({'lm': ..., maybe
  'reward_head': ...}, host numpy arrays), or {'lm': ...} for an HF directory.

  `dtype`: for HF, the dtype the weights are read in (default float32); for jpost, the compute
  dtype set on the config (the stored weights keep their dtype; the matmuls cast them).
  """
  import jax.numpy as jnp

  from jpost.models import config as model_config
  from jpost.models import hf

  if source.kind == "hf":
    cfg, lm = hf.load_hf(source.path, dtype=jnp.dtype(dtype or "float32"))
    return cfg, {"lm": lm}
  from jpost.checkpoints import train_ckpt   # checkpoints depend on models, not the reverse

  cfg = model_config.read_model_config_json(os.path.join(source.workdir, "model_config.json"))
  params = dict(train_ckpt.load_params(source.path))
  if "lm" not in params:
    raise ValueError(f"{source.spec}: the checkpoint's params have no 'lm' entry (found "
                     f"{sorted(params)})")
  if "lora" in params:
    # A LoRA run trains adapters beside a frozen (maybe quantised) base, which load_params
    # rebuilt from the run's config.json (its checkpoints hold the adapters only): every script
    # that samples, scores or merges wants the trained model, i.e. the adapters merged in.
    from jpost.adapters import lora
    lora_section = source.run_config().get("lora")
    if not lora_section:
      raise ValueError(f"{source.spec}: the checkpoint holds LoRA adapters but its run's "
                       "config.json has no 'lora' section to read rank / alpha / targets from")
    params["lm"] = lora.export_lm(params, lora_section, cfg)
    del params["lora"]
  if dtype:
    cfg = dataclasses.replace(cfg, dtype=dtype)
  return cfg, params


def load_lm(source: ModelSource, dtype: str | None = None):
  """-> (ModelConfig, language-model params)."""
  cfg, params = load(source, dtype)
  return cfg, params["lm"]
