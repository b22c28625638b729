"""The config tree every recipe in configs/ starts from, and the `:key=value` preset argument.

A recipe (`configs/dpo.py`) calls `base_config(objective, arg)`, sets its defaults and returns the
tree; `scripts/train.py` loads it with `lock_config=True`, so `--config.optim.lrr=1` fails with a
suggestion instead of being ignored.
"""
import difflib
import json
import os

import ml_collections
from etils import epath

from jpost.adapters import lora as lora_adapters
from jpost.data import config as data_config
from jpost.losses import registry
from jpost.train import optim


def parse_arg(arg: str | None, allowed: dict) -> dict:
  """'model=qwen3_0_6b,loss=ipo' -> {'model': 'qwen3_0_6b', 'loss': 'ipo'}; unknown keys fail."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r}: expected key=value (keys: {sorted(allowed)})")
    key, value = item.split("=", 1)
    if key not in allowed:
      hint = difflib.get_close_matches(key, allowed, n=1)
      raise ValueError(f"config argument {key!r} is not a preset key"
                       + (f"; did you mean {hint[0]!r}?" if hint else f" (keys: {sorted(allowed)})"))
    out[key] = value
  return {**allowed, **out}


def base_config(objective: str) -> ml_collections.ConfigDict:
  obj = registry.get_objective(objective)
  c = ml_collections.ConfigDict()
  c.model = dict(
      name="tiny",              # a named ModelConfig (jpost.models.get_model_config)
      init="random",            # random | hf:PATH | ckpt:PATH (a jpost workdir or checkpoint dir)
      # Precision policy. `dtype` is the compute dtype (activations, matmul inputs); weights are
      # stored in `param_dtype` and cast to `dtype` where used, and the optimiser state (Adam
      # moments) follows `param_dtype`; gradients are accumulated in float32 and norms, softmax,
      # log-probs and losses run in float32 either way. Policies:
      #   float32 / float32    the recipes' default: their recorded numbers are float32 runs, and
      #                        CPU bf16 matmuls are slower than float32 ones;
      #   bfloat16 / float32   mixed precision for accelerators (scripts/bench_step.py's default):
      #                        bf16 matmuls, float32 master weights and optimiser state;
      #   bfloat16 / bfloat16  bf16 params and optimiser state: half the memory, but updates
      #                        smaller than a weight's bf16 spacing (~|w| / 256) are lost.
      dtype="float32",          # compute dtype: float32 | bfloat16 | float16
      param_dtype="float32",    # master weights and optimiser state
      # Activation checkpointing of each scanned layer: none | full (recompute the whole layer
      # in the backward pass) | dots (save matmul outputs) | dots_no_batch (save only matmul
      # outputs without batch dims, i.e. weight-like ones).
      remat="none",
      # Full-sequence attention: auto (cudnn on GPU / splash on TPU where they apply, else
      # XLA's attention; logged) | xla (explicit path) | cudnn (cuDNN flash attention; GPU,
      # bf16, no soft-cap) | splash (Pallas splash kernel; TPU, no sliding window). A kernel
      # named explicitly that the backend lacks is an error, not a fallback; KV-cache decode
      # steps always use the XLA path.
      attention="auto",
  )
  c.objective = obj.default_config().to_dict()
  c.objective.name = objective
  c.data = data_config.default_config()
  c.train = dict(
      steps=100,
      batch_size=16,            # examples (pairs for pairwise data) per optimiser step, all hosts
      grad_accum=1,             # micro-batches per step; batch_size must divide by it
      seed=0,
      log_every=10,
      max_nonfinite_streak=5,   # abort after this many consecutive skipped (non-finite) steps
  )
  c.warm_start = dict(
      sft_steps=0,              # >0: first run this many SFT steps (same data, chosen side) and
      sft_lr=1e-3,              # start the policy and the reference from the result
      sft_batch_size=0,         # 0 = train.batch_size
      sft_weight_decay=0.0,
  )
  c.optim = optim.default_config()
  # LoRA / QLoRA (jpost/adapters/lora.py): rank 0 = full fine-tuning; validated at the start of
  # a run. The SFT warm start (warm_start.sft_steps) always trains full weights.
  c.lora = lora_adapters.default_config()
  c.eval = dict(every_steps=50, batch_size=32, max_batches=0)   # 0 = the whole held-out split
  c.checkpoint = dict(every_steps=100, keep=2, async_save=True)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.ops = dict(impl="auto")     # token_logprobs implementation
  # precompute: score the training / eval data once with the reference (cached in
  # <workdir>/ref_cache) and run no reference in the step; see jpost/train/ref_cache.py.
  c.ref = dict(precompute=False)
  if obj.data_kind == "rl":
    c.rl = rl_config()
    c.eval.num_samples = 4      # pass@k on held-out prompts: k samples at rl.temperature
  # hf_dir: write HF safetensors here at the end of training (local or gs://, streamed tensor by
  # tensor from every process: jpost/train/export.py), in files of at most max_shard_bytes.
  c.export = dict(hf_dir="", max_shard_bytes=5 * 2**30)
  c.log = dict(tensorboard=True, plot=True)   # plot: metrics.png at the end (process 0)
  return c


def rl_config() -> dict:
  """The `rl` section of online recipes (jpost.rl.loop); the estimator's parts are `objective`."""
  return dict(
      group_size=8,             # G completions sampled per prompt (train.batch_size prompts)
      max_new_tokens=8,         # generation limit (completions cut here are 'truncated')
      temperature=1.0,          # sampling temperature; the trainer's log-probs use the same
      top_p=1.0,
      top_k=0,                  # 0 = off
      stop=(),                  # stop strings (their tokens end a completion and are kept)
      rewards="math",           # 'name[*weight],...': math | exact_match | regex_format | bleu |
                                # pkg.module:function
      reward_workers=8,         # host threads scoring completions
      reward_timeout_s=10.0,    # per call; a reward past it is an error showing the row
      no_eos_penalty=0.0,       # != 0: the reward of truncated completions (Tulu 3: -10)
      correct_threshold=1.0,    # a reward >= this counts as correct (accuracy, pass@k, HPT)
      num_iterations=1,         # passes over each rollout batch (PPO epochs)
      mini_batches=1,           # optimiser updates per pass
      old_logp="trainer",       # behaviour log-probs: 'trainer' (recomputed) | 'sampler'
      max_sampling_rounds=4,    # dynamic sampling: prompt batches sampled at most per iteration
  )


def rl_recipe(c: ml_collections.ConfigDict, *, steps=200, lr=3e-4, batch_size=64, sft_steps=1500):
  """Defaults shared by the online recipes' embedded runs (configs/grpo.py, ...).

  An SFT phase on the built-in task's answers (`warm_start.sft_steps`, the SFT recipe's 1500
  steps of 32: held-out greedy accuracy 0.79, but only 0.52 of temperature-1 samples are right),
  then `steps` iterations of `batch_size` prompts x 8 samples, one update each, at a constant lr.
  The tiny model is fragile (measured from that SFT model): lr 1e-3 drops held-out greedy
  accuracy to 0.3 within 50 iterations; two updates per batch of 32 prompts drop it to 0.63;
  64 prompts per update keep it at 0.79 while the held-out sample reward rises.
  """
  c.train.update(steps=steps, batch_size=batch_size, log_every=25)
  # The SFT recipe's optimiser (configs/sft.py): its weight decay matters for the held-out
  # accuracy this phase reaches (0.79 with 0.01, 0.45 without, same seed).
  c.warm_start.update(sft_steps=sft_steps, sft_lr=3e-3, sft_batch_size=32, sft_weight_decay=0.01)
  c.optim.update(lr=lr, schedule="constant", warmup_steps=5, weight_decay=0.0)
  c.data.max_prompt_len = 16
  c.eval.update(every_steps=50, batch_size=50, num_samples=4)
  c.checkpoint.every_steps = 50
  return c


def preference_recipe(c: ml_collections.ConfigDict, *, steps=150, lr=1e-4, sft_steps=400):
  """Defaults shared by the preference / feedback recipes' embedded runs (configs/dpo.py, ...).

  From random init a short SFT phase on the built-in task (the `sft` view of `data.train`: the
  correct answers) gives the policy and the reference something to prefer with; then the
  objective runs. With your own data, set `warm_start.sft_steps=0` and start from an SFT model
  (`model.init=hf:...` or `ckpt:...`).
  """
  c.train.update(steps=steps, batch_size=32, log_every=25)
  c.warm_start.update(sft_steps=sft_steps, sft_lr=3e-3)
  c.optim.update(lr=lr, warmup_steps=10)
  c.eval.every_steps = 50
  c.checkpoint.every_steps = 50
  return c


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  path = epath.Path(workdir) / "config.json"   # local or gs://
  path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
  return os.fspath(path)
