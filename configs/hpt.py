"""Hybrid Post-Training (ALGORITHMS.md §5, preset `hpt`) on built-in arithmetic prompts.

  python scripts/train.py --config=configs/hpt.py
  python scripts/train.py --config=configs/hpt.py:model=qwen3_0_6b \
      --config.model.init=hf:/path/to/Qwen3-0.6B --config.data.tokenizer=hf:/path/to/Qwen3-0.6B \
      --config.warm_start.sft_steps=0 --config.data.train=data/prompts.jsonl \
      --config.data.eval=data/prompts_eval.jsonl --config.rl.max_new_tokens=1024

Estimator: per prompt: SFT on the demonstration when no rollout is correct, else Dr.GRPO on the rollouts; logs hpt/sft_frac.
The embedded default starts from random init, runs a short SFT phase on the task's answers
(`warm_start.sft_steps`, same run) and then reinforces with the `math` reward (1 if the final
number is right). Arg keys: model.
"""
from jpost.train.config import base_config, parse_arg, rl_recipe


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny"})
  c = base_config("hpt")
  c.model.name = a["model"]
  # A shorter SFT phase than the other recipes (held-out accuracy ~0.1), so most prompts start
  # with no correct rollout and HPT's switch has something to do: `hpt/sft_frac` then falls as
  # the demonstrations (SFT) and rollouts (Dr.GRPO) raise the accuracy.
  rl_recipe(c, steps=300, lr=1e-3, batch_size=32, sft_steps=600)
  return c
