"""Helpers shared by tests that run the scripts: one-device and multi-process subprocess runs,
metrics by step, loading a script as a module. (tests/ is on sys.path through tests/conftest.py.)"""
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# XLA:CPU aborts the process when a device thread is 40 s late to a collective, which an
# 8-device step on 2 busy cores can be (seen once in a full-suite run): wait longer.
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_collective_call_terminate_timeout_seconds=900 "
                        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300")


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess: `devices` fake CPU devices and the long collective
  timeouts."""
  return f"--xla_force_host_platform_device_count={devices} {CPU_COLLECTIVE_FLAGS}"


def _train_cmd_env(workdir, flags, recipe, devices, fault):
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
  for key in ("JPOST_TEST_FAULT", "JPOST_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
              "JPOST_NUM_PROCESSES", "JPOST_PROCESS_ID"):
    env.pop(key, None)
  if fault:
    env["JPOST_TEST_FAULT"] = fault
  if isinstance(flags, dict):
    flags = [f"--config.{k}={v}" for k, v in flags.items()]
  cmd = [sys.executable, os.path.join(ROOT, "scripts/train.py"), f"--config={recipe}",
         f"--workdir={workdir}"] + list(flags)
  return cmd, env


def train(workdir, flags, *, recipe="configs/sft.py", fault=None, timeout=600, devices=1,
          extra_env=None):
  """`scripts/train.py` in one process on `devices` fake CPU devices; `flags` a list of args or
  a {config key: value} dict.

  `fault` sets JPOST_TEST_FAULT (e.g. 'kill_after_save:4', see jpost/train/loop.py).
  """
  cmd, env = _train_cmd_env(workdir, flags, recipe, devices, fault)
  env.update(extra_env or {})
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def compile_cache_env(directory) -> dict:
  """Environment for a persistent JAX compilation cache in `directory`: the later runs of a test
  that launches the same programs several times (a run and its resumption) skip most compiles."""
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, flags, *, recipe="configs/sft.py", num_processes=2,
                    devices_per_process=4, fault=None, extra_env=None):
  """Starts `scripts/train.py` as one multi-process JAX job on this machine (jax.distributed on
  127.0.0.1, gloo CPU collectives) and returns the Popen objects, process id order.

  `fault` is a string for every process or a {process_id: fault} dict.
  """
  address = f"127.0.0.1:{free_port()}"
  procs = []
  for pid in range(num_processes):
    f = fault.get(pid) if isinstance(fault, dict) else fault
    cmd, env = _train_cmd_env(workdir, flags, recipe, devices_per_process, f)
    env.update(JPOST_COORDINATOR_ADDRESS=address, JPOST_NUM_PROCESSES=str(num_processes),
               JPOST_PROCESS_ID=str(pid), **(extra_env or {}))
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def wait_processes(procs, timeout=600):
  """[(returncode, stdout, stderr)] of `start_processes`' jobs; kills them all on a timeout."""
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append((p.returncode, stdout, stderr))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  return out


def train_processes(workdir, flags, **kw):
  """`start_processes` + `wait_processes`: a finished multi-process run."""
  timeout = kw.pop("timeout", 600)
  return wait_processes(start_processes(workdir, flags, **kw), timeout=timeout)


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


def load_config(name, *args):
  """configs/<name>.py's `get_config(*args)`: a recipe's config tree, unlocked, for in-process runs."""
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


@contextlib.contextmanager
def fake_gcs(root, monkeypatch):
  """gs://BUCKET/PATH served from root/BUCKET/PATH through fsspec, as etils.epath reaches real
  GCS (gcsfs). Appends are refused, as objects cannot be appended to; renames (a copy and a
  delete on GCS, not atomic) work but are logged in `.renamed`. Yields the file system class
  (`.root`, `.renamed`)."""
  from etils.epath import backend
  from fsspec.implementations.local import LocalFileSystem
  root = str(root)
  os.makedirs(root, exist_ok=True)

  class FakeGCS(LocalFileSystem):
    protocol = ("gs", "gcs")
    renamed = []

    def __init__(self, *args, finalize_on_close=False, **kw):
      del finalize_on_close
      super().__init__(*args, **kw)

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      if path.startswith(root):
        return path
      return f"{root}/{path}"

    def _open(self, path, mode="rb", **kw):
      if "a" in mode:
        raise NotImplementedError("fake GCS: objects cannot be appended to")
      if "w" in mode:   # object names need no parent "directories"
        os.makedirs(os.path.dirname(self._strip_protocol(path)), exist_ok=True)
      return super()._open(path, mode, **kw)

    def mv(self, path1, path2, *args, **kw):
      FakeGCS.renamed.append((path1, path2))
      return super().mv(path1, path2, *args, **kw)

  FakeGCS.root = root
  # The module itself: the attribute `fsspec.registry` is a read-only view of this dict.
  registry = importlib.import_module("fsspec.registry")._registry
  for name in ("gs", "gcs"):
    monkeypatch.setitem(registry, name, FakeGCS)
  backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.setattr("etils.epath.gpath._is_tf_installed", lambda: False, raising=False)
  try:
    yield FakeGCS
  finally:
    backend.fsspec_backend._get_filesystem.cache_clear()
