"""Helpers shared by tests that run the scripts: one-device subprocess runs, metrics by step,
loading a script as a module. (tests/ is on sys.path through tests/conftest.py.)"""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(workdir, flags, *, recipe="configs/sft.py", fault=None, timeout=600):
  """`scripts/train.py` on one CPU device; `flags` a list of args or a {config key: value} dict.

  `fault` sets JPOST_TEST_FAULT (e.g. 'kill_after_save:4', see jpost/train/loop.py).
  """
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  env.pop("JPOST_TEST_FAULT", None)
  if fault:
    env["JPOST_TEST_FAULT"] = fault
  if isinstance(flags, dict):
    flags = [f"--config.{k}={v}" for k, v in flags.items()]
  cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), f"--config={recipe}",
         f"--workdir={workdir}"] + list(flags)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def metrics_by_step(workdir, *keys, require="train/loss"):
  """{step: value (one key) or tuple of values} from metrics.jsonl rows holding `require`; a
  step logged twice (a resumed run) keeps its last row."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if require in row:
        values = tuple(row[k] for k in keys or (require,))
        out[row["step"]] = values[0] if len(values) == 1 else values
  return out


def load_script(name):
  """scripts/<name>.py as a module (its functions, without running main)."""
  spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                os.path.join(ROOT, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def random_params(model_cfg, seed=0):
  """Random params drawn on the host from the abstract shapes: no init compile per config, and
  norm scales away from their identity init (so a missed norm shows)."""
  import jax
  import numpy as np
  from jpost import models
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    if path[-1].key == "scale":
      return (1.0 + 0.1 * rng.normal(size=shape.shape)).astype(np.float32)
    return (0.2 * rng.normal(size=shape.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, models.param_shapes(model_cfg))
