"""Exact resume: a run killed with SIGKILL and resumed equals the uninterrupted run, bit for bit.

Each run is a real `scripts/train.py` subprocess on one CPU device; faults are injected with
JPOST_TEST_FAULT (see jpost/train/loop.py), so the kill lands at a known point.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jpost.checkpoints import train_ckpt

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_jsonl(path, n):
  with open(path, "w") as f:
    for i in range(n):
      a, b = i % 7, (3 * i) % 5
      f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n")


def _train(workdir, flags, fault=None, recipe="configs/sft.py"):
  return helpers.train(workdir, flags, recipe=recipe, fault=fault)


def _losses(workdir):
  return helpers.metrics_by_step(workdir)


def _flags(data_path, **overrides):
  base = {"train.steps": 8, "train.batch_size": 8, "train.log_every": 1, "checkpoint.every_steps": 4,
          "eval.every_steps": 0, "data.train": data_path, "data.eval": data_path,
          "data.max_len": 16, "log.tensorboard": False, "optim.warmup_steps": 2}
  base.update(overrides)
  return [f"--config.{k}={v}" for k, v in base.items()]


def _assert_same_run(a, b):
  la, lb = _losses(a), _losses(b)
  assert sorted(la) == sorted(lb) == list(range(1, len(la) + 1))
  assert la == lb, {s: (la[s], lb[s]) for s in la if la[s] != lb[s]}
  pa, pb = train_ckpt.load_params(a), train_ckpt.load_params(b)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.parametrize("case", [
    # kill mid-epoch (20 rows / 8 per step: an epoch is 2.5 steps)
    dict(rows=20, overrides={}, kill_at=4),
    # grad accumulation (4 micro-batches of 2) and a kill exactly at an epoch boundary. Slow
    # (~50 s of 2 cores): accumulation exactness is tested in tests/train/test_step.py and
    # kill + resume by the case above, the async-save kill and the two-process preemption test.
    pytest.param(dict(rows=16, overrides={"train.grad_accum": 4, "checkpoint.every_steps": 2},
                      kill_at=2), marks=pytest.mark.slow),
])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, case):
  data = str(tmp_path / "train.jsonl")
  _write_jsonl(data, case["rows"])
  flags = _flags(data, **case["overrides"])
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  r = _train(straight, flags)
  assert r.returncode == 0, r.stderr[-3000:]
  r = _train(killed, flags, fault=f"kill_after_save:{case['kill_at']}")
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  assert max(_losses(killed)) == case["kill_at"]
  r = _train(killed, flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  _assert_same_run(straight, killed)


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
  data = str(tmp_path / "train.jsonl")
  _write_jsonl(data, 20)
  flags = _flags(data)
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert _train(straight, flags).returncode == 0
  r = _train(killed, flags, fault="kill_during_save:8")
  assert r.returncode == -9, r.stderr[-3000:]
  ckpt = train_ckpt.Checkpointer(os.path.join(killed, "checkpoints"))
  # The interrupted save of step 8 never committed; step 4 is the latest complete checkpoint.
  assert ckpt.latest_step() == 4, os.listdir(os.path.join(killed, "checkpoints"))
  ckpt.close()
  r = _train(killed, flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout and "/4" in r.stdout
  _assert_same_run(straight, killed)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  data = str(tmp_path / "train.jsonl")
  _write_jsonl(data, 20)
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), "--config=configs/sft.py",
         f"--workdir={workdir}"] + _flags(data, **{"train.steps": 100000})
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  for line in proc.stdout:          # wait until training is under way
    if line.startswith("step "):
      break
  proc.terminate()
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved step" in out
  ckpt = train_ckpt.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.latest_step() is not None and ckpt.latest_step() > 0
  ckpt.close()


def test_config_typo_suggests_the_key(tmp_path):
  r = _train(str(tmp_path / "run"), ["--config.optim.lrr=1"])
  assert r.returncode != 0
  assert "lrr" in r.stderr and "lr" in r.stderr.split("lrr", 1)[1]


def test_init_from_hf_and_export_at_end(tmp_path):
  """model.init=hf:DIR starts from those weights; export.hf_dir writes what the run trained."""
  import dataclasses
  from jpost import models
  cfg = dataclasses.replace(models.get_model_config("tiny"), dtype="float32")
  start = models.init_params(cfg, jax.random.PRNGKey(7))
  models.save_hf(cfg, start, str(tmp_path / "start_hf"))
  data = str(tmp_path / "train.jsonl")
  _write_jsonl(data, 20)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "exported")
  flags = _flags(data, **{"train.steps": 2, "checkpoint.every_steps": 0,
                          "model.init": f"hf:{tmp_path / 'start_hf'}", "export.hf_dir": out})
  r = _train(workdir, flags)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"HF export:   {out}" in r.stdout
  _, exported = models.load_hf(out, dtype=np.float32)
  trained = train_ckpt.load_params(workdir)["lm"]
  jax.tree.map(np.testing.assert_array_equal, exported, trained)
  # The run started from the HF weights: 2 small steps move every weight only a little.
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), exported, start))
  assert 0 < max(diffs) < 0.05


def test_bco_resume_carries_the_running_shift(tmp_path):
  """BCO's running reward mean lives in the train state: a killed + resumed run is identical."""
  data = str(tmp_path / "feedback.jsonl")
  with open(data, "w") as f:
    for i in range(24):
      a, b = i % 7, (3 * i) % 5
      good = i % 2 == 0
      f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b + (0 if good else 1)),
                          "label": good}) + "\n")
  flags = _flags(data, **{"warm_start.sft_steps": 0})
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  assert _train(straight, flags, recipe="configs/bco.py").returncode == 0
  r = _train(killed, flags, fault="kill_after_save:4", recipe="configs/bco.py")
  assert r.returncode == -9, r.stderr[-3000:]
  r = _train(killed, flags, recipe="configs/bco.py")
  assert r.returncode == 0, r.stderr[-3000:]
  _assert_same_run(straight, killed)
  shifts = [json.loads(l).get("bco/shift") for l in open(os.path.join(killed, "metrics.jsonl"))]
  assert len({s for s in shifts if s is not None}) > 2   # the shift really moves
