"""Merge fine-tuned models into their base: task arithmetic or LiNeS layer scaling (HF output).

  # Task arithmetic: theta_0 + lam * sum_t (theta_t - theta_0)   (--merge=mean: the average)
  python scripts/merge.py --base=hf:/models/base --finetuned=runs/sft-a --finetuned=runs/sft-b \
      --out=out/merged [--method=task_arithmetic] [--lam=1.0] [--merge=sum|mean]

  # LiNeS: block l of L scaled by alpha + beta * l / (L - 1); embeddings, final norm, lm_head by
  # alpha. One model: alpha=0.5, beta=1-alpha by default. T models: alpha = (||sum tau_t||_1 /
  # ||tau_merged||_1) / T (1/T for --merge=sum), beta=0.5 by default (tune it).
  python scripts/merge.py --base=hf:/models/base --finetuned=runs/sft-a --out=out/lines \
      --method=lines [--alpha=0.3] [--beta=0.7]

--base / --finetuned: `hf:DIR` (or any directory with an HF config.json) or a jpost workdir (its
checkpoints/ directory or a step directory also work; the latest checkpoint's `lm` params). All
inputs must describe the same architecture. The output directory gets config.json (the first
fine-tuned model's, so its EOS / special token ids), model.safetensors, the tokenizer files of
the first input that has them, and merge_info.json (inputs and the coefficients used).
Arithmetic is in float32; weights are written in --dtype (default: the base's stored dtype).
"""
import argparse
import dataclasses
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Fields that do not change the weights' meaning: they may differ between the inputs.
IGNORED_CONFIG_FIELDS = ("name", "dtype", "param_dtype", "remat", "attention_impl", "bos_token_id",
                         "eos_token_id", "pad_token_id", "initializer_range",
                         "max_position_embeddings")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja")


class InputError(ValueError):
  """A problem with the command line or the inputs, reported without a traceback."""


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  p.add_argument("--base", required=True, help="the pre-trained model: hf:DIR or a jpost workdir")
  p.add_argument("--finetuned", action="append", required=True,
                 help="a fine-tuned model (repeatable): hf:DIR or a jpost workdir")
  p.add_argument("--out", required=True, help="output directory (Hugging Face format)")
  p.add_argument("--method", choices=("task_arithmetic", "lines"), default="task_arithmetic")
  p.add_argument("--merge", choices=("sum", "mean"), default="sum",
                 help="how several task vectors combine (default: sum, task arithmetic)")
  p.add_argument("--lam", type=float, default=None, help="task arithmetic scale (default 1)")
  p.add_argument("--alpha", type=float, default=None, help="LiNeS: scale of block 0 and of "
                 "non-block params (default: 0.5 for one model, the norm-ratio formula for more)")
  p.add_argument("--beta", type=float, default=None, help="LiNeS: extra scale of the last block "
                 "(default: 1 - alpha for one model, 0.5 for more)")
  p.add_argument("--dtype", default=None, help="output weight dtype (default: the base's)")
  args = p.parse_args(argv)
  if args.method == "task_arithmetic" and (args.alpha is not None or args.beta is not None):
    p.error("--alpha / --beta are LiNeS coefficients: add --method=lines")
  if args.method == "lines" and args.lam is not None:
    p.error("--lam is the task arithmetic scale; LiNeS uses --alpha / --beta")
  return args


def config_differences(a, b) -> list[str]:
  """Architecture fields (ModelConfig) that differ between two models."""
  da, db = dataclasses.asdict(a), dataclasses.asdict(b)
  return [f"{k}: {da[k]!r} vs {db[k]!r}" for k in da
          if k not in IGNORED_CONFIG_FIELDS and da[k] != db[k]]


def _stored_dtype(source, lm) -> str:
  """The dtype the base's weights are stored in (the default output dtype)."""
  import numpy as np

  if source.kind == "hf":
    with open(os.path.join(source.path, "config.json")) as f:
      dtype = json.load(f).get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "float32"
  return str(np.asarray(lm["embed"]["embedding"]).dtype)


def _tokenizer_dir(source) -> str | None:
  """Where a model's tokenizer files are: the HF directory, or a run's data.tokenizer=hf:DIR."""
  if source.kind == "hf":
    return source.path
  spec = source.run_config().get("data", {}).get("tokenizer", "")
  return os.path.expanduser(spec[3:]) if spec.startswith("hf:") else None


def copy_tokenizer(sources, out: str) -> str | None:
  """Copies the tokenizer files of the first source that has a tokenizer.json; -> its dir."""
  for source in sources:
    d = _tokenizer_dir(source)
    if d and os.path.exists(os.path.join(d, "tokenizer.json")):
      for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(d, name)):
          shutil.copy(os.path.join(d, name), os.path.join(out, name))
      return d
  return None


def run(args) -> dict:
  """Writes args.out; returns the merge info."""
  import jax.numpy as jnp
  from jpost import models
  from jpost.edit import merging
  from jpost.models import resolve

  try:
    base_src = resolve.resolve(args.base)
    ft_srcs = [resolve.resolve(spec) for spec in args.finetuned]
  except FileNotFoundError as e:
    raise InputError(str(e)) from None
  base_cfg, base = resolve.load_lm(base_src)
  out_dtype = args.dtype or _stored_dtype(base_src, base)
  try:
    jnp.dtype(out_dtype)
  except TypeError:
    raise InputError(f"--dtype={out_dtype}: not a dtype") from None
  configs = []

  def finetuned():
    # One fine-tuned model in memory at a time; its config is checked before its weights are used.
    for src in ft_srcs:
      cfg, lm = resolve.load_lm(src)
      diff = config_differences(base_cfg, cfg)
      if diff:
        raise InputError(f"--finetuned={src.spec} is not the same architecture as "
                         f"--base={base_src.spec}: " + "; ".join(diff))
      configs.append(cfg)
      yield lm

  axes = models.param_logical_axes(base_cfg)
  try:
    params, info = merging.merge(base, finetuned(), axes, method=args.method, how=args.merge,
                                 lam=1.0 if args.lam is None else args.lam, alpha=args.alpha,
                                 beta=args.beta, dtype=jnp.dtype(out_dtype))
  except ValueError as e:
    if isinstance(e, InputError):
      raise
    raise InputError(str(e)) from None
  # The first fine-tuned model's config: its EOS / special token ids are what the merged model
  # was trained to emit.
  out_cfg = dataclasses.replace(configs[0], dtype=out_dtype, param_dtype=out_dtype)
  models.save_hf(out_cfg, params, args.out)
  tok = copy_tokenizer(ft_srcs + [base_src], args.out)
  info = dict(info, base=args.base, finetuned=list(args.finetuned), dtype=out_dtype,
              tokenizer_from=tok)
  with open(os.path.join(args.out, "merge_info.json"), "w") as f:
    json.dump(info, f, indent=2)
  return info


def main(argv=None):
  args = parse_args(argv)
  try:
    info = run(args)
  except (InputError, FileNotFoundError) as e:
    print(f"merge.py: error: {e}", file=sys.stderr)
    return 1
  coef = {k: info[k] for k in ("lam", "alpha", "beta") if k in info}
  print(f"merged {info['num_tasks']} model(s) into {args.base} with {info['method']} {coef} "
        f"-> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
