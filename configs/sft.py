"""Supervised fine-tuning (ALGORITHMS.md §1) on the built-in arithmetic task.

  python scripts/train.py --config=configs/sft.py
  python scripts/train.py --config=configs/sft.py:loss=dft
  python scripts/train.py --config=configs/sft.py:model=qwen3_0_6b \
      --config.model.init=hf:/path/to/Qwen3-0.6B --config.data.tokenizer=hf:/path/to/Qwen3-0.6B \
      --config.data.train=data/sft.jsonl --config.data.eval=data/sft_eval.jsonl

Arg keys: model (a named model config), loss (nll | dft | asft | sft_kl).
"""
from jpost.train.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, {"model": "tiny", "loss": "nll"})
  c = base_config(a["loss"])
  c.model.name = a["model"]
  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.log_every = 50
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.01
  c.eval.every_steps = 500
  c.checkpoint.every_steps = 500
  return c
