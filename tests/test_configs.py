"""Every recipe in configs/ loads (locked), and runs a few steps end to end on its built-in data."""
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py")))
ONLINE = {"grpo", "dapo", "dr_grpo", "gspo", "ppo", "hpt", "luffy", "prefix_rft"}
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
FLAGS = {"train.steps": 2, "train.batch_size": 8, "warm_start.sft_steps": 0,
         "eval.every_steps": 0, "eval.max_batches": 1, "eval.batch_size": 8,
         "checkpoint.every_steps": 0, "log.tensorboard": False, "data.max_len": 16}
# Online: 4 prompts x 2 samples per step, short completions, no pass@k pass. The point is that
# every estimator / mixing path runs end to end, not how well.
ONLINE_FLAGS = dict(FLAGS, **{"train.batch_size": 4, "rl.group_size": 2, "rl.max_new_tokens": 4,
                              "eval.num_samples": 0})


def test_all_recipes_found():
  assert {"sft", "dpo", "kto", "bco", "rm", "prm"} | ONLINE <= set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(set(RECIPES) - ONLINE) + ["grpo"])
def test_recipe_runs_a_few_steps(recipe, tmp_path):
  flags = ONLINE_FLAGS if recipe in ONLINE else FLAGS
  cmd = [sys.executable, "scripts/train.py", f"--config=configs/{recipe}.py",
         f"--workdir={tmp_path}"] + [f"--config.{k}={v}" for k, v in flags.items()]
  r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "metrics:" in r.stdout and os.path.exists(tmp_path / "metrics.jsonl")
  assert "eval step 2:" in r.stdout


# The other online recipes run in one process (one JAX start-up, the sampler compiled once for
# all of them): the same locked config loading and overrides as scripts/train.py, then the loop.
_RUN_ONLINE = """
import importlib.util, json, sys
from jpost.rl import loop
recipes, flags, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
for name in recipes:
  spec = importlib.util.spec_from_file_location(name, f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  cfg.lock()
  cfg.update_from_flattened_dict(dict(flags, **({"objective.hpt.n": 2} if name == "hpt" else {})))
  out = loop.run(cfg, f"{root}/{name}")
  print("RESULT", name, json.dumps({"steps": out["steps"], "eval": out["last_eval"]}), flush=True)
"""


def test_other_online_recipes_run_a_few_iterations(tmp_path):
  recipes = sorted(ONLINE - {"grpo"})
  cmd = [sys.executable, "-c", _RUN_ONLINE, json.dumps(recipes), json.dumps(ONLINE_FLAGS),
         str(tmp_path)]
  r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  results = {line.split()[1]: json.loads(line.split(maxsplit=2)[2])
             for line in r.stdout.splitlines() if line.startswith("RESULT")}
  assert sorted(results) == recipes
  for name, res in results.items():
    assert res["steps"] == 2 and "eval/reward_mean" in res["eval"], (name, res)
    assert os.path.exists(tmp_path / name / "metrics.jsonl")
