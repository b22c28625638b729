"""Export the latest checkpoint of a jpost run as a Hugging Face directory (safetensors).

  python scripts/export_hf.py runs/dpo-20261121-120000 out/hf_dir [--dtype bfloat16]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdir", help="a jpost workdir (with model_config.json and checkpoints/)")
  parser.add_argument("out", help="output directory")
  parser.add_argument("--dtype", default=None, help="cast weights (e.g. bfloat16) before writing")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from jpost import models
  from jpost.checkpoints import train_ckpt

  model_cfg = models.read_model_config_json(os.path.join(args.workdir, "model_config.json"))
  params = train_ckpt.load_params(args.workdir)["lm"]
  if args.dtype:
    params = jax.tree.map(lambda x: jnp.asarray(x, args.dtype), params)
  models.save_hf(model_cfg, params, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
