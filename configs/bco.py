"""Binary classifier optimisation (ALGORITHMS.md §3) on built-in unpaired feedback.

  python scripts/train.py --config=configs/bco.py

The running reward mean (`shift`) lives in the train state and is checkpointed, so a resumed run
equals the uninterrupted one. Rows: {prompt, completion, label}.
"""
from jpost.train.config import base_config, parse_arg, preference_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("bco")
  c.model.name = a["model"]
  return preference_recipe(c)
