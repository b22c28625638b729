"""Implicit process reward model, cross-entropy form (ALGORITHMS.md §3), on built-in feedback.

  python scripts/train.py --config=configs/prm.py

Trains BCE(sigmoid(beta * (S_theta - S_ref)), label) per response [beta = 0.05]; at inference the
per-token reward is beta * (lp - ref) (jpost.losses.unpaired.prm_token_rewards); per-step scores:
`python scripts/score.py rows.jsonl --model=WORKDIR --ref=REF_WORKDIR_OR_hf:DIR` (the reference is
the warm-start SFT model, `WORKDIR/warm_start_sft`, for the embedded default).
"""
from jpost.train.config import base_config, parse_arg, preference_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("implicit_prm")
  c.model.name = a["model"]
  return preference_recipe(c)
