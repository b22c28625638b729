"""Export the latest checkpoint of a jpost run as a Hugging Face directory (safetensors).

  python scripts/export_hf.py runs/dpo-20261121-120000 out/hf_dir [--dtype bfloat16]
  python scripts/export_hf.py runs/dpo-lora out/adapter --adapters=peft [--base=HF_DIR]
  python scripts/export_hf.py gs://bucket/runs/dpo gs://bucket/hf/dpo    # object stores (epath)

A LoRA run (`lora.rank > 0`) exports either the base with the adapters merged in
(`--adapters=merged`, the default: a plain transformers model; a quantised base is dequantised
first) or the adapters alone in the PEFT format (`--adapters=peft`: adapter_config.json +
adapter_model.safetensors for `peft.PeftModel.from_pretrained`). The PEFT config points at the
base model: `--base`, else the run's `model.init=hf:` directory when the base was not quantised,
else the run's base (dequantised) written to OUT/base. A LoRA run's checkpoints hold no base: it is
rebuilt from the run's config.json (`model.init`, `lora.quantize`) and must match the fingerprint
saved with the adapters (jpost.checkpoints.train_ckpt.load_params).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cast(tree, dtype):
  import jax
  import jax.numpy as jnp
  return tree if not dtype else jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="a jpost workdir (with model_config.json and checkpoints/)")
  parser.add_argument("out", help="output directory (local or gs://...)")
  parser.add_argument("--dtype", default=None, help="cast weights (e.g. bfloat16) before writing")
  parser.add_argument("--adapters", choices=("merged", "peft"), default="merged",
                      help="LoRA runs: merge adapters into the weights, or write them for PEFT")
  parser.add_argument("--base", default=None,
                      help="with --adapters=peft: the HF directory of the base model to name in "
                           "adapter_config.json (default: see the module docstring)")
  args = parser.parse_args()

  from etils import epath

  from jpost import models
  from jpost.adapters import lora
  from jpost.adapters import peft
  from jpost.checkpoints import train_ckpt

  workdir = epath.Path(args.workdir)
  model_cfg = models.read_model_config_json(os.fspath(workdir / "model_config.json"))
  params = train_ckpt.load_params(args.workdir)
  if "lora" not in params:
    if args.adapters == "peft" or args.base:
      parser.error(f"{args.workdir} is not a LoRA run (its params have no adapters): "
                   "--adapters=peft / --base do not apply")
    models.save_hf(model_cfg, params["lm"], args.out, dtype=args.dtype)
    print(f"wrote {args.out}")
    return

  run_cfg = json.loads((workdir / "config.json").read_text())
  if args.adapters == "merged":
    models.save_hf(model_cfg, lora.export_lm(params, run_cfg["lora"], model_cfg), args.out,
                   dtype=args.dtype)
    print(f"wrote {args.out} (LoRA adapters merged)")
    return
  spec = lora.spec_from_config(run_cfg["lora"], model_cfg.param_dtype)
  base = args.base
  init = run_cfg["model"]["init"]
  if base is None and init.startswith("hf:") and spec.quantize == "none":
    base = os.path.abspath(init[3:])
  if base is None:
    base = os.fspath(epath.Path(args.out) / "base")
    base = base if "://" in base else os.path.abspath(base)
    base_lm = lora.dequantized_base(params["lm"], model_cfg, model_cfg.param_dtype)
    models.save_hf(model_cfg, base_lm, base, dtype=args.dtype)
    print(f"wrote the base model to {base}")
  peft.save(args.out, _cast(params["lora"], args.dtype), spec, base)
  print(f"wrote {args.out} (PEFT LoRA adapters, base_model_name_or_path={base})")


if __name__ == "__main__":
  main()
