"""LoRA adapters <-> the PEFT format (`adapter_config.json` + `adapter_model.safetensors`).

What `peft.PeftModel.from_pretrained(transformers_model, dir)` reads: per layer i and target,

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

with `in` / `out` the HF Linear's features (jpost's A [L, r, *in] and B [L, *out, r] flatten to
these row-major, the same way the kernels flatten to HF weights), and scaling lora_alpha / r.
The base model is a separate HF directory (`base_model_name_or_path`).
"""
import json
import os

import numpy as np
from etils import epath

from jpost.adapters import lora
from jpost.models import safetensors_io

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers.{i}."


def adapter_tensors(adapters, spec: lora.LoraSpec) -> dict:
  """{PEFT tensor name: np.ndarray} from jpost adapters (host arrays, their own dtype)."""
  out = {}
  for name in spec.targets:
    path, _, hf_module = lora.TARGETS[name]
    ab = lora.get_path(adapters, path)
    a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
    for i in range(a.shape[0]):
      key = _PREFIX.format(i=i) + hf_module
      out[key + ".lora_A.weight"] = a[i].reshape(spec.rank, -1)
      out[key + ".lora_B.weight"] = b[i].reshape(-1, spec.rank)
  return out


def adapter_config(spec: lora.LoraSpec, base_model_name_or_path: str) -> dict:
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": spec.rank,
      "lora_alpha": spec.alpha,
      "lora_dropout": spec.dropout,
      "target_modules": list(spec.targets),
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "rank_pattern": {},
      "alpha_pattern": {},
  }


def save(path: str, adapters, spec: lora.LoraSpec, base_model_name_or_path: str) -> None:
  """Writes adapter_config.json + adapter_model.safetensors into `path` (local or gs://)."""
  out = epath.Path(path)
  out.mkdir(parents=True, exist_ok=True)
  safetensors_io.write(os.fspath(out / WEIGHTS_FILE), adapter_tensors(adapters, spec),
                       {"format": "pt"})
  (out / CONFIG_FILE).write_text(json.dumps(adapter_config(spec, base_model_name_or_path),
                                            indent=2, sort_keys=True))


def load(path: str, model_cfg) -> tuple:
  """A PEFT LoRA directory -> (LoraSpec, adapters) for `model_cfg`'s jpost layout.

  Refuses what jpost's LoRA does not implement (DoRA, rsLoRA, per-module ranks, bias training,
  other modules) instead of loading something that would compute differently.
  """
  with open(os.path.join(path, CONFIG_FILE)) as f:
    c = json.load(f)
  where = os.path.join(path, CONFIG_FILE)
  if c.get("peft_type") != "LORA":
    raise ValueError(f"{where}: peft_type={c.get('peft_type')!r}, expected 'LORA'")
  for key, ok in (("use_dora", False), ("use_rslora", False), ("bias", "none"),
                  ("fan_in_fan_out", False), ("modules_to_save", None),
                  ("layers_to_transform", None), ("rank_pattern", {}), ("alpha_pattern", {})):
    if c.get(key) not in (ok, None):
      raise ValueError(f"{where}: {key}={c[key]!r} is not supported by jpost's LoRA")
  targets = c["target_modules"]
  targets = ",".join(targets) if isinstance(targets, list) else targets
  spec = lora.LoraSpec(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                       dropout=float(c.get("lora_dropout") or 0.0),
                       targets=lora.parse_targets(targets))
  tensors = safetensors_io.SafetensorsFile(os.path.join(path, WEIGHTS_FILE))
  adapters, used = {}, set()
  for name in spec.targets:
    path_, _, hf_module = lora.TARGETS[name]
    layers, ins, outs = lora.kernel_dims(model_cfg, name)
    a, b = [], []
    for i in range(layers):
      key = _PREFIX.format(i=i) + hf_module
      for kind, dst, shape in (("lora_A", a, (spec.rank,) + ins), ("lora_B", b, outs + (spec.rank,))):
        t = f"{key}.{kind}.weight"
        if t not in tensors:
          raise ValueError(f"{path}: tensor {t!r} is missing")
        dst.append(np.asarray(tensors.get(t)).reshape(shape))
        used.add(t)
    adapters = lora.set_path(adapters, path_, {"a": np.stack(a), "b": np.stack(b)})
  extra = sorted(set(tensors.keys()) - used)
  if extra:
    raise ValueError(f"{path}: {len(extra)} tensors are not LoRA factors of the targets "
                     f"{list(spec.targets)} (e.g. {extra[:2]})")
  return spec, adapters
