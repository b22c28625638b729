"""Every recipe in configs/ loads (locked), and runs a few steps end to end on its built-in data."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))


ONLINE = {"grpo", "dapo", "dr_grpo", "gspo", "ppo", "hpt", "luffy", "prefix_rft"}


def test_all_recipes_found():
  assert {"sft", "dpo", "kto", "bco", "rm", "prm"} | ONLINE <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_a_few_steps(recipe, tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  flags = {"train.steps": 2, "train.batch_size": 8, "warm_start.sft_steps": 0,
           "eval.every_steps": 0, "eval.max_batches": 1, "eval.batch_size": 8,
           "checkpoint.every_steps": 0, "log.tensorboard": False, "data.max_len": 16}
  if recipe in ONLINE:
    # Two prompts x 2 samples per step, short completions, no pass@k pass: the point is that
    # every estimator / mixing path runs end to end, not how well.
    flags.update({"train.batch_size": 4, "rl.group_size": 2, "rl.max_new_tokens": 4,
                  "eval.num_samples": 0})
    if recipe == "hpt":
      flags["objective.hpt.n"] = 2
  cmd = [sys.executable, "scripts/train.py", f"--config=configs/{recipe}.py",
         f"--workdir={tmp_path}"] + [f"--config.{k}={v}" for k, v in flags.items()]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "metrics:" in r.stdout and os.path.exists(tmp_path / "metrics.jsonl")
  assert "eval step 2:" in r.stdout
