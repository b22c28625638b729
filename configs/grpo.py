"""Group Relative Policy Optimization (ALGORITHMS.md §4, preset `grpo`) on built-in arithmetic prompts.

  python scripts/train.py --config=configs/grpo.py
  python scripts/train.py --config=configs/grpo.py:model=qwen3_0_6b \
      --config.model.init=hf:/path/to/Qwen3-0.6B --config.data.tokenizer=hf:/path/to/Qwen3-0.6B \
      --config.warm_start.sft_steps=0 --config.data.train=data/prompts.jsonl \
      --config.data.eval=data/prompts_eval.jsonl --config.rl.max_new_tokens=1024

Estimator: on-policy ratio, PPO clip 0.2, group-normalised advantages, seq-mean-token-mean, k3 KL 0.04.
The embedded default starts from random init, runs a short SFT phase on the task's answers
(`warm_start.sft_steps`, same run) and then reinforces with the `math` reward (1 if the final
number is right). Arg keys: model, preset (grpo | cispo | rloo | reinforce | srft | policy_gradient: the
estimator presets without a file of their own).
"""
from jpost.train.config import base_config, parse_arg, rl_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny", "preset": "grpo"})
  c = base_config(a["preset"])
  c.model.name = a["model"]
  rl_recipe(c)
  return c
