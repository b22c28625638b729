"""Direct preference optimisation and its family (ALGORITHMS.md §2) on built-in preference data.

  python scripts/train.py --config=configs/dpo.py
  python scripts/train.py --config=configs/dpo.py:loss=ipo
  python scripts/train.py --config=configs/dpo.py:model=qwen3_0_6b \
      --config.model.init=hf:/path/to/Qwen3-0.6B --config.data.tokenizer=hf:/path/to/Qwen3-0.6B \
      --config.data.train=data/prefs.jsonl --config.data.eval=data/prefs_eval.jsonl

The embedded default starts from random init, runs a short SFT phase on the chosen answers
(`warm_start.sft_steps`) and then trains DPO with that SFT model as the reference.
Arg keys: model, loss (sigmoid | dpo_norm | ipo | hinge | robust | bco_pair | simpo | orpo).
"""
from jpost.train.config import base_config, parse_arg, preference_recipe

# Per-loss beta where ALGORITHMS.md / the papers' recipes differ from DPO's 0.1.
_BETA = {"dpo_norm": 5.0, "simpo": 2.0}


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny", "loss": "sigmoid"})
  c = base_config(a["loss"])
  c.model.name = a["model"]
  if a["loss"] in _BETA:
    c.objective.beta = _BETA[a["loss"]]
  preference_recipe(c)
  return c
