"""PPO with a value head (ALGORITHMS.md §4, preset `ppo`) on built-in arithmetic prompts.

  python scripts/train.py --config=configs/ppo.py
  python scripts/train.py --config=configs/ppo.py:model=qwen3_0_6b \
      --config.model.init=hf:/path/to/Qwen3-0.6B --config.data.tokenizer=hf:/path/to/Qwen3-0.6B \
      --config.warm_start.sft_steps=0 --config.data.train=data/prompts.jsonl \
      --config.data.eval=data/prompts_eval.jsonl --config.rl.max_new_tokens=1024

Estimator: GAE (gamma 1, lambda 0.95) from a scalar value head on the policy trunk, k1 KL in the reward, value clipping.
The embedded default starts from random init, runs a short SFT phase on the task's answers
(`warm_start.sft_steps`, same run) and then reinforces with the `math` reward (1 if the final
number is right). Arg keys: model.
"""
from jpost.train.config import base_config, parse_arg, rl_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("ppo")
  c.model.name = a["model"]
  rl_recipe(c)
  return c
