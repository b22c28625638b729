"""Multi-process offline training on CPU: two `jax.distributed` processes on 127.0.0.1 (4 fake
devices each, gloo collectives) train what one process with 8 devices trains.

The default-run test is one chain of real `scripts/train.py` launches sharing a JAX compilation
cache (a resumed launch reuses the programs its first launch compiled):

  1. one process, 8 devices: the reference run;
  2. two processes; SIGTERM reaches process 1 only (JPOST_TEST_FAULT=sigterm:3): both agree on a
     step through JAX's preemption service, save it and exit 0;
  3. two processes resume that checkpoint, finish and export HF weights (streamed tensor by
     tensor from both processes' shards: the same bytes as one process's export);
  4. one process (8 devices) resumes a copy of the same two-process checkpoint and finishes.

Runs 2+3 and 4 must reproduce the reference's per-step train losses and eval losses.
"""
import filecmp
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jpost import models
from jpost.checkpoints import train_ckpt
from jpost.train import export as texport

import helpers

# Two cross-process all-reduces (gloo) sum in another order than one process's in-process
# all-reduce, so losses may differ in the last bits; the issue asks for <= 1e-5 relative.
RTOL = 1e-5


def _write_jsonl(path, n, offset=0, repeat=lambda i: 1):
  with open(path, "w") as f:
    for i in range(offset, offset + n):
      a, b = i % 7, (3 * i) % 5
      f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b) * repeat(i)}) + "\n")
  return str(path)


def _flags(tmp_path, **overrides):
  flags = {"train.steps": 10, "train.batch_size": 8, "train.log_every": 1,
           "checkpoint.every_steps": 0, "eval.every_steps": 5, "eval.batch_size": 8,
           "data.train": _write_jsonl(tmp_path / "train.jsonl", 40),
           "data.eval": _write_jsonl(tmp_path / "eval.jsonl", 12, offset=100),
           "data.max_len": 16, "log.tensorboard": False, "log.plot": False,
           "optim.warmup_steps": 2}
  flags.update(overrides)
  return flags


def _ok(result):
  """(returncode, stdout, stderr) or a CompletedProcess -> stdout, failing with the output."""
  rc, out, err = result if isinstance(result, tuple) else (result.returncode, result.stdout,
                                                          result.stderr)
  assert rc == 0, f"exit {rc}\n{out[-2000:]}\n{err[-4000:]}"
  return out


def _max_rel_diff(got: dict, want: dict) -> float:
  assert sorted(got) == sorted(want), (sorted(got), sorted(want))
  return max(abs(got[s] - want[s]) / abs(want[s]) for s in want)


def _saved_step(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith("SIGTERM: saved step ")]
  assert len(lines) == 1, stdout[-2000:]
  return int(lines[0].split()[3])


def _data_item(workdir, step):
  ckpt = train_ckpt.Checkpointer(os.path.join(workdir, "checkpoints"))
  data = ckpt.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  ckpt.close()
  return data


def _rows_per_step(workdir, key):
  counts = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        counts[row["step"]] = counts.get(row["step"], 0) + 1
  return counts


def test_two_processes_train_preempt_and_resume_like_one(tmp_path):
  flags = _flags(tmp_path)
  cache = helpers.compile_cache_env(tmp_path / "jax_cache")
  ref, two, two_to_one = (str(tmp_path / n) for n in ("ref", "two", "two_to_one"))

  _ok(helpers.train(ref, flags, devices=8, extra_env=cache, timeout=300))

  # SIGTERM to process 1 only: both processes save the same step and exit 0.
  first = helpers.train_processes(two, flags, fault={1: "sigterm:3"},
                                  extra_env=dict(cache, TF_CPP_MIN_LOG_LEVEL="0"), timeout=300)
  saved = [_saved_step(_ok(r)) for r in first]
  assert saved[0] == saved[1] and 3 < saved[0] < flags["train.steps"], saved
  # JAX's notifier logs the signal where it landed: process 1, not process 0.
  assert "SIGTERM caught" in first[1][2] and "SIGTERM caught" not in first[0][2]
  # Both processes' data iterator states are in the checkpoint.
  data = _data_item(two, saved[0])
  assert data["process_count"] == 2 and len(data["per_process"]) == 2
  shutil.copytree(two, two_to_one)

  # The end-of-run export streams each tensor from both processes' shards: several files.
  flags_end = dict(flags, **{"export.hf_dir": f"{two}/hf", "export.max_shard_bytes": 200_000})
  second = helpers.train_processes(two, flags_end, extra_env=cache, timeout=300)
  for r in second:
    assert f"resumed from {two}/checkpoints/{saved[0]}\n" in _ok(r)
  assert "HF export:" in second[0][1] and "metrics:" not in second[1][1]

  out = _ok(helpers.train(two_to_one, flags, devices=8, extra_env=cache, timeout=300))
  assert (f"resumed from {two_to_one}/checkpoints/{saved[0]} (saved by 2 processes, now 1)"
          in out)

  want = helpers.metrics_by_step(ref)
  want_eval = helpers.metrics_by_step(ref, "eval/loss", require="eval/loss")
  assert sorted(want) == list(range(1, 11)) and sorted(want_eval) == [0, 5, 10]
  diffs = {}
  for run in (two, two_to_one):
    diffs[run] = (_max_rel_diff(helpers.metrics_by_step(run), want),
                  _max_rel_diff(helpers.metrics_by_step(run, "eval/loss", require="eval/loss"),
                                want_eval))
  print("max relative loss differences (train, eval):", diffs)
  assert all(d <= RTOL for pair in diffs.values() for d in pair), diffs
  # Only process 0 writes metrics: one row per step (process 1 would have added a copy each).
  assert _rows_per_step(two, "train/loss") == {s: 1 for s in range(1, 11)}
  assert _rows_per_step(two, "eval/loss") == {0: 1, 5: 1, 10: 1}
  # The final weights agree too (measured: at most 1.2e-7 apart, one float32 ulp at 1; near-zero
  # weights make a relative bound alone meaningless), and the export is what the two processes
  # trained.
  final_ref, final_two = train_ckpt.load_params(ref), train_ckpt.load_params(two)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6),
               final_two, final_ref)
  _, exported = models.load_hf(f"{two}/hf", dtype=np.float32)
  jax.tree.map(np.testing.assert_array_equal, exported, final_two["lm"])
  # Byte for byte what one process exports from the same params.
  one = str(tmp_path / "one_process_hf")
  texport.save_hf(jax.device_put(final_two), None,
                  models.read_model_config_json(f"{two}/model_config.json"), one,
                  max_shard_bytes=200_000)
  files = sorted(os.listdir(one))
  assert sorted(os.listdir(f"{two}/hf")) == files and "model.safetensors.index.json" in files
  for name in files:
    assert filecmp.cmp(f"{two}/hf/{name}", f"{one}/{name}", shallow=False), name


# ------------------------------------------------------------------------- fast, in-process

def _data_cfg(tmp_path, **overrides):
  from jpost.data import config
  cfg = config.default_config()
  cfg.update(dict(train=_write_jsonl(tmp_path / "d.jsonl", 13), eval="", max_len=16,
                  **overrides))
  return cfg


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in ("tokens", "loss_mask")}


def test_unpacked_state_resumes_in_another_process_count_packed_refuses(tmp_path):
  from jpost.data import make_train_iterator
  cfg = _data_cfg(tmp_path)
  make = lambda p, n: make_train_iterator(cfg, "sft", batch_size=4, seed=1, process_index=p,
                                          process_count=n)
  two = [make(p, 2) for p in range(2)]
  for it in two:
    for _ in range(5):   # mid-epoch (13 examples / 4 per batch)
      next(it)
  states = json.loads(json.dumps([it.get_state() for it in two]))   # as the checkpoint holds them
  one = make(0, 1)
  one.set_state_from_processes(states)
  for _ in range(4):   # the same global batches as the two processes' slices, in order
    want = _concat([next(it) for it in two])
    got = next(one)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  packed = _data_cfg(tmp_path, pack=True)
  make = lambda p, n: make_train_iterator(packed, "sft", batch_size=4, seed=1, process_index=p,
                                          process_count=n)
  states = [make(p, 2).get_state() for p in range(2)]
  with pytest.raises(ValueError, match=r"saved by 2 process\(es\) and this run has 1.*"
                                       r"resume with 2 process\(es\)"):
    make(0, 1).set_state_from_processes(states)
  it = make(1, 2)   # the same count: each process takes its own state
  it.set_state_from_processes(states)
  assert it.get_state() == states[1]


def test_gather_json_collects_every_process(tmp_path):
  """Two real processes (jax.distributed on 127.0.0.1): payloads of different sizes arrive in
  process order on both."""
  script = tmp_path / "gather.py"
  script.write_text(
      "import json, sys\n"
      "import jax\n"
      "jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))\n"
      "from jpost.checkpoints import train_ckpt\n"
      "pid = jax.process_index()\n"
      "print(json.dumps(train_ckpt.gather_json({'p': pid, 'pad': 'x' * (40 * pid)})))\n")
  address = f"127.0.0.1:{helpers.free_port()}"
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS="cpu", PYTHONPATH=helpers.ROOT)
  procs = [subprocess.Popen([sys.executable, str(script), address, str(p)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  want = [{"p": 0, "pad": ""}, {"p": 1, "pad": "x" * 40}]
  for r in helpers.wait_processes(procs, timeout=120):
    assert json.loads(_ok(r).strip().splitlines()[-1]) == want
  assert train_ckpt.gather_json({"a": 1}) == [{"a": 1}]   # one process: no collective


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/PATH served from tmp_path/gcs/BUCKET/PATH (helpers.fake_gcs: no appends)."""
  with helpers.fake_gcs(tmp_path / "gcs", monkeypatch):
    yield tmp_path / "gcs"


def test_workdir_files_go_through_epath_to_gs(fake_gcs):
  import ml_collections
  from jpost.train import config as tconfig
  from jpost.train import metrics as tmetrics
  from jpost.train import plot
  from jpost.train import ref_cache
  workdir = "gs://bucket/run"
  on_disk = fake_gcs / "bucket" / "run"

  cfg = ml_collections.ConfigDict({"train": {"steps": 3}})
  assert tconfig.save_config(cfg, workdir) == f"{workdir}/config.json"
  assert json.loads((on_disk / "config.json").read_text()) == {"train": {"steps": 3}}

  # Rows reach the object at flush() (the loop flushes before each checkpoint) and close().
  writer = tmetrics.MetricsWriter(workdir, is_main=True, tensorboard=False)
  writer.write(1, {"train/loss": 2.0})
  writer.write(2, {"train/loss": float("nan")})
  assert not (on_disk / "metrics.jsonl").exists()
  writer.flush()
  assert helpers.metrics_by_step(str(on_disk)) == {1: 2.0, 2: "nan"}
  writer.close()
  # A resumed run keeps the earlier rows.
  resumed = tmetrics.MetricsWriter(workdir, is_main=True, tensorboard=False)
  resumed.write(3, {"train/loss": 1.5})
  resumed.close()
  assert helpers.metrics_by_step(str(on_disk)) == {1: 2.0, 2: "nan", 3: 1.5}
  silent = tmetrics.MetricsWriter(workdir, is_main=False, tensorboard=False)
  silent.write(4, {"train/loss": 1.0})
  silent.close()
  assert max(helpers.metrics_by_step(str(on_disk))) == 3

  assert plot.plot_metrics(str(resumed.path)) == f"{workdir}/metrics.png"
  assert (on_disk / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  table = np.arange(6, dtype=np.float32).reshape(3, 2)
  path = f"{workdir}/ref_cache/k.npz"
  ref_cache._write(path, "k", table)
  np.testing.assert_array_equal(ref_cache._read(path, "k", (3, 2)), table)
  assert sorted(os.listdir(on_disk / "ref_cache")) == ["k.npz"]

  (on_disk / "checkpoints").mkdir()
  assert train_ckpt.find_checkpoint_dir(workdir) == f"{workdir}/checkpoints"


def test_local_metrics_are_appended_at_once(tmp_path):
  from jpost.train import metrics as tmetrics
  writer = tmetrics.MetricsWriter(str(tmp_path), is_main=True, tensorboard=False)
  writer.write(1, {"train/loss": 2.0})
  assert helpers.metrics_by_step(str(tmp_path)) == {1: 2.0}   # visible before any flush
  writer.close()


# ------------------------------------------------------------------------------------- slow

@pytest.mark.slow
def test_packed_two_process_run_sigterm_on_both_then_one_process_refuses(tmp_path):
  """Slow (four launches, three of them two-process: ~3 min on 2 cores). Packed data is dealt
  per process, so: the per-process states differ and both land in the checkpoint; SIGTERM to
  both processes at different steps (2 and 4) still gives one agreed step; one process refuses
  that checkpoint before training, naming both counts; two processes resume exactly."""
  # Completions of 1-4 repeats: the processes' packers take different numbers of examples.
  varied = _write_jsonl(tmp_path / "varied.jsonl", 40, repeat=lambda i: 1 + i % 4)
  flags = _flags(tmp_path, **{"data.pack": True, "data.train": varied})
  cache = helpers.compile_cache_env(tmp_path / "jax_cache")
  straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
  for r in helpers.train_processes(straight, flags, extra_env=cache, timeout=300):
    _ok(r)
  first = helpers.train_processes(run, flags, fault={0: "sigterm:2", 1: "sigterm:4"},
                                  extra_env=cache, timeout=300)
  saved = [_saved_step(_ok(r)) for r in first]
  assert saved[0] == saved[1] and 2 < saved[0] < flags["train.steps"], saved
  data = _data_item(run, saved[0])
  assert data["process_count"] == 2 and data["per_process"][0] != data["per_process"][1]

  refused = helpers.train(run, flags, devices=8, extra_env=cache, timeout=300)
  assert refused.returncode != 0
  assert "saved by 2 process(es) and this run has 1" in refused.stderr, refused.stderr[-3000:]
  assert "\nstep " not in refused.stdout   # refused before training

  for r in helpers.train_processes(run, flags, extra_env=cache, timeout=300):
    assert f"resumed from {run}/checkpoints/{saved[0]}\n" in _ok(r)
  assert helpers.metrics_by_step(run) == helpers.metrics_by_step(straight)
