"""Bradley-Terry reward model (ALGORITHMS.md §2) on built-in preference pairs.

  python scripts/train.py --config=configs/rm.py

A scalar head reads each sequence's last token (its EOS); `eval/rm_accuracy` is the held-out
fraction of pairs with r(chosen) > r(rejected). The embedded default starts from the short SFT
phase's language model and a zero-initialised head. Score JSONL rows with the result:
`python scripts/score.py rows.jsonl --model=WORKDIR`.
"""
from jpost.train.config import base_config, parse_arg, preference_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("rm_bt")
  c.model.name = a["model"]
  return preference_recipe(c, lr=1e-3)
