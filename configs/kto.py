"""Kahneman-Tversky optimisation (ALGORITHMS.md §3) on built-in unpaired feedback.

  python scripts/train.py --config=configs/kto.py
  python scripts/train.py --config=configs/kto.py --config.data.train=data/feedback.jsonl \
      --config.data.eval=data/feedback_eval.jsonl --config.warm_start.sft_steps=0 \
      --config.model.init=ckpt:runs/sft-...

Rows: {prompt, completion, label}. The embedded default starts with a short SFT phase on the
correct answers (see `preference_recipe`), then trains KTO with that model as the reference.
"""
from jpost.train.config import base_config, parse_arg, preference_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("kto")
  c.model.name = a["model"]
  return preference_recipe(c)
