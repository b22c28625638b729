"""tpu/launch.py: slice arithmetic, the exact gcloud commands, and the supervisor's recovery.

The supervisor tests run the real launcher against tests/launch/fake_gcloud.py, which executes
the worker scripts in per-worker folders: launch, status, stop and install really run, and a
stub train.py resumes from the shared workdir, so "relaunch continues from the checkpoint" is
observed rather than assumed.
"""
import contextlib
import io
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import fake_gcloud
from tpu import gcloud, launch, remote, topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InProcessRunner(gcloud.Runner):
  """Calls fake_gcloud.main directly: the same fake, minus ~0.15 s of interpreter start-up per
  call. The preemption test keeps the real subprocess path through the `gcloud` on PATH."""

  def run(self, argv, *, capture=False, check=True, shell=False):
    if shell or argv[0] != "gcloud":
      return super().run(argv, capture=capture, check=check, shell=shell)
    self.say("+ " + gcloud.display(argv))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = fake_gcloud.main(argv[1:])
    if check and rc:
      raise RuntimeError(f"command failed with exit code {rc}: {err.getvalue()}")
    return gcloud.Result(rc, out.getvalue(), err.getvalue())


def run_cli(args, in_process=False):
  out = io.StringIO()
  a = launch.parse_args(args)
  runner = (InProcessRunner if in_process else gcloud.Runner)(dry_run=a.dry_run, out=out)
  rc = launch.supervise(a, runner) if a.command == "supervise" else None
  if rc is None:
    {"create": launch.run_create, "setup": launch.run_setup, "launch": launch.run_launch,
     "stop": launch.run_stop, "logs": launch.run_logs, "status": launch.run_status}[a.command](
         a, runner)
  return rc, out.getvalue()


def commands(text):
  """The argv of every single-line `+ gcloud ...` command a dry run printed."""
  return [shlex.split(l[2:]) for l in text.splitlines()
          if l.startswith("+ gcloud") and "--command=" not in l]


# --- topology ------------------------------------------------------------------------------

@pytest.mark.parametrize("acc,chips,hosts,per_host,runtime", [
    ("v5litepod-8", 8, 1, 8, "v2-alpha-tpuv5-lite"),
    ("v5e-16", 16, 4, 4, "v2-alpha-tpuv5-lite"),       # alias -> v5litepod-16
    ("v5litepod-256", 256, 64, 4, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 4, 1, 4, "v2-alpha-tpuv5"),               # v5p counts TensorCores: 2 per chip
    ("v5p-64", 32, 8, 4, "v2-alpha-tpuv5"),
    ("v6e-8", 8, 1, 8, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, 4, "v2-alpha-tpuv6e"),
    ("v6e-4", 4, 1, 4, "v2-alpha-tpuv6e"),
])
def test_slice_arithmetic(acc, chips, hosts, per_host, runtime):
  sl = topology.parse(acc)
  assert (sl.chips, sl.hosts, sl.chips_per_host, sl.runtime) == (chips, hosts, per_host, runtime)
  assert sl.hosts * sl.chips_per_host == sl.chips


@pytest.mark.parametrize("bad", ["v5litepod-12", "v5p-4", "v7-8", "tpu-8", "v6e"])
def test_bad_accelerator_types_fail_with_examples(bad):
  with pytest.raises(ValueError, match="accelerator type"):
    topology.parse(bad)


def test_mesh_options_cover_the_slice_and_fit():
  sl = topology.parse("v5p-64")
  opts = topology.fsdp_options(sl, "llama3_8b")
  assert (1, 32) in opts and all(d * f == 32 for d, f in opts)
  # 8.03B params x 20 bytes (fp32 AdamW + reference) = 150 GiB: too big for one v5e-8.
  assert topology.fsdp_options(topology.parse("v5litepod-8"), "llama3_8b") == []
  assert topology.fsdp_options(topology.parse("v6e-8"), "llama3_8b", param_dtype="bfloat16")
  assert "--config.mesh.fsdp=32" in topology.describe("v5p-64", "llama3_8b")


def test_model_table_matches_jpost_configs():
  import jax
  import numpy as np
  from jpost import models
  from jpost.models import decoder
  for name, count in topology.MODEL_PARAMS.items():
    cfg = models.get_model_config(name)
    shapes = decoder.param_shapes(cfg)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count, name
    assert topology.MODEL_SHAPES[name] == (cfg.num_layers, cfg.d_model, cfg.mlp_dim,
                                           cfg.num_heads)


# --- exact commands --------------------------------------------------------------------------

BASE = ["--name=jp", "--zone=us-east5-a", "--project=my-proj", "--dry_run"]


@pytest.mark.parametrize("extra,want", [
    ([], ["gcloud", "compute", "tpus", "tpu-vm", "create", "jp", "--accelerator-type=v5p-64",
          "--version=v2-alpha-tpuv5", "--zone=us-east5-a", "--project=my-proj"]),
    (["--spot"], ["gcloud", "compute", "tpus", "tpu-vm", "create", "jp",
                  "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--zone=us-east5-a",
                  "--project=my-proj", "--spot"]),
    (["--queued", "--spot", "--create_flag=--valid-until-duration=6h"],
     ["gcloud", "compute", "tpus", "queued-resources", "create", "jp", "--node-id=jp",
      "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5", "--zone=us-east5-a",
      "--project=my-proj", "--spot", "--valid-until-duration=6h"]),
])
def test_create_commands(extra, want):
  _, out = run_cli(["create", "--accelerator_type=v5p-64", *BASE, *extra])
  assert commands(out) == [want]


def test_dry_run_supervise_prints_the_whole_flow():
  rc, out = run_cli(["supervise", "--accelerator_type=v5litepod-16", *BASE, "--spot",
                     "--mount_bucket=my-bucket", "--workdir=runs/dpo", "--",
                     "--config=configs/dpo.py:model=llama3_2_1b", "--config.mesh.fsdp=16"])
  assert rc == 0
  cmds = commands(out)
  assert cmds[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "jp"]
  assert cmds[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "jp"]
  assert "--spot" in cmds[1] and "--accelerator-type=v5litepod-16" in cmds[1]
  scp = cmds[2]
  assert scp[4] == "scp" and scp[6] == "jp:jpost.tar.gz" and "--worker=all" in scp
  ssh_lines = [l for l in out.splitlines() if l.startswith("+ gcloud compute tpus tpu-vm ssh")]
  assert len(ssh_lines) == 4 and all("--worker=all" in l for l in ssh_lines)
  # install, launch (the train command with the mounted workdir), status, and the stop used
  # before a relaunch, in that order; then the delete of the recovery path.
  assert out.index("uv pip install") < out.index("scripts/train.py") < out.index(
      "JPOST_STATUS running") < out.index("tpu-vm delete jp") < out.index("kill -TERM")
  assert ("scripts/train.py --config=configs/dpo.py:model=llama3_2_1b --config.mesh.fsdp=16 "
          "--workdir=/mnt/jpost_gcs/runs/dpo") in out
  assert "gcsfuse --implicit-dirs" in out and "export JPOST_DISTRIBUTED=tpu" in out
  assert "--project=my-proj" in cmds[-1] and cmds[-1][4] == "delete"


def test_displayed_multiline_commands_are_exact_shell():
  t = gcloud.Target("jp", "z", None)
  scripts = [remote.install_script("git", git_url="https://example.com/x.git", git_ref="v1",
                                   mount_bucket="b", mount_point="/mnt/x"),
             remote.launch_script(["--config=configs/sft.py", "--config.data.train=a b.jsonl",
                                   "--workdir=/w"], {"K": "it's"}),
             remote.status_script(), remote.stop_script(5)]
  for script in scripts:
    argv = gcloud.ssh(t, script)
    shown = gcloud.display(argv)
    echoed = subprocess.run(["bash", "-c", "printf '%s\\0' " + shown], check=True,
                            capture_output=True, text=True).stdout
    assert echoed.split("\0")[:-1] == argv


def test_workdir_rules():
  def wd(*extra):
    return launch.workdir(launch.parse_args(["launch", "--name=n", "--zone=z", *extra]))
  assert wd("--accelerator_type=v5litepod-8", "--workdir=/home/me/run") == "/home/me/run"
  assert wd("--accelerator_type=v5p-64", "--mount_bucket=b", "--workdir=runs/a") == \
      "/mnt/jpost_gcs/runs/a"
  assert wd("--accelerator_type=v5p-64", "--shared_workdir", "--workdir=/nfs/a") == "/nfs/a"
  with pytest.raises(SystemExit, match="8 workers.*shared path"):
    wd("--accelerator_type=v5p-64", "--workdir=/home/me/run")
  with pytest.raises(SystemExit, match="gs://"):
    wd("--accelerator_type=v5litepod-8", "--workdir=gs://bucket/run")
  with pytest.raises(SystemExit, match="need --workdir"):
    wd("--accelerator_type=v5litepod-8")


# --- worker scripts, run for real -----------------------------------------------------------

def test_worker_scripts_launch_status_stop(tmp_path, stub_repo):
  home = tmp_path / "home"
  (home / "jpost").mkdir(parents=True)
  os.symlink(os.path.join(stub_repo, "scripts"), home / "jpost" / "scripts")
  (home / "jpost_venv" / "bin").mkdir(parents=True)
  os.symlink(sys.executable, home / "jpost_venv" / "bin" / "python")
  env = dict(os.environ, HOME=str(home))

  def sh(script):
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)

  def status():
    return remote.parse_status(sh(remote.status_script()).stdout)

  assert status() == "none"
  wd = str(tmp_path / "wd")
  start = remote.launch_script(["--config=stub:steps=100000,dt=0.01", f"--workdir={wd}"],
                               {"EXTRA": "x y"})
  assert sh(start).returncode == 0
  _wait(lambda: status() == "running" and os.path.exists(f"{wd}/ckpt-home"))
  again = sh(start)
  assert again.returncode == 3 and "still active" in again.stderr
  sh(remote.stop_script(10))
  assert status() == "stopped"      # SIGTERM: saved and exited 0, which is not "finished"
  log = (home / remote.LOG).read_text()
  assert "JPOST_DISTRIBUTED=tpu EXTRA=x y" in log and "SIGTERM: saved step" in log

  assert sh(start).returncode == 0  # relaunch resumes from the checkpoint
  _wait(lambda: open(f"{wd}/starts-home").read().split()[-1] != "0")
  pid = int((home / remote.RUN_DIR / "pid").read_text())
  os.killpg(pid, 9)                 # like the OOM killer or a kernel panic: no exit code
  _wait(lambda: status() == "dead")


def test_the_sigterm_marker_is_what_the_loop_prints():
  # `stopped` (resume) vs `exited 0` (finished) hinges on this line of jpost/train/loop.py.
  src = open(os.path.join(REPO, "jpost", "train", "loop.py")).read()
  assert f'print(f"{remote.SIGTERM_MARK} {{step}}' in src


def _wait(pred, timeout=10.0):
  import time
  end = time.time() + timeout
  while not pred():
    assert time.time() < end, "timed out"
    time.sleep(0.02)


# --- the supervisor against the fake cloud ---------------------------------------------------

def _supervise(cloud, repo, tmp_path, *extra, config="steps=30,dt=0.02", workers=1,
               in_process=True):
  bucket = tmp_path / "bucket"
  cloud.set(workers=workers)
  args = ["supervise", "--name=jp", "--zone=z", f"--accelerator_type=v5p-{8 * workers}",
          f"--source_dir={repo}", f"--workdir={bucket}/run", "--shared_workdir",
          "--poll_seconds=0.1", "--stop_grace=5", f"--logs_dir={tmp_path / 'logs'}",
          "--env=EXTRA=1", *extra, "--", f"--config=stub:{config}"]
  rc, out = run_cli(args, in_process)
  return rc, out, str(bucket / "run")


def test_supervise_recreates_after_preemption_and_resumes(fake_cloud, stub_repo, tmp_path):
  fake_cloud.set(preempt_at=2, preempt_when=[
      str(tmp_path / "bucket" / "run" / f"ckpt-worker-{i}") for i in range(2)])
  rc, out, wd = _supervise(fake_cloud, stub_repo, tmp_path, workers=2, in_process=False)
  assert rc == 0, out
  verbs = fake_cloud.verbs()
  assert verbs.count("tpu-vm create") == 2 and verbs.count("tpu-vm delete") == 1
  # the delete follows the describe that saw PREEMPTED; then create, copy, install, launch
  i_del = verbs.index("tpu-vm delete")
  assert verbs[i_del - 1] == "tpu-vm describe" and verbs[i_del + 1] == "tpu-vm create"
  assert verbs[i_del + 2:i_del + 6] == ["tpu-vm describe", "tpu-vm scp", "tpu-vm ssh",
                                        "tpu-vm ssh"]
  for w in ("worker-0", "worker-1"):
    starts = [int(s) for s in open(f"{wd}/starts-{w}").read().split()]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 5, starts   # resumed
    assert open(f"{wd}/ckpt-{w}").read() == "30"
    log = open(tmp_path / "logs" / f"{w}.log").read()
    assert "stub: finished" in log and "JPOST_DISTRIBUTED=tpu EXTRA=1" in log
  assert "PREEMPTED; deleting and recreating" in out and "training finished" in out
  installs = open(os.path.join(fake_cloud.root, "uv.log")).read().splitlines()
  assert len(installs) == 4 and all("[tpu]" in l for l in installs)   # 2 workers x 2 VMs


def test_supervise_queued_resource_suspended(fake_cloud, stub_repo, tmp_path):
  fake_cloud.set(queued=True, preempt_at=2)
  rc, out, wd = _supervise(fake_cloud, stub_repo, tmp_path, "--queued", "--spot",
                           config="steps=5,dt=0.02")
  assert rc == 0, out
  calls = fake_cloud.calls()
  deletes = [c for c in calls if c[2:4] == ["queued-resources", "delete"]]
  assert len(deletes) == 1 and "--force" in deletes[0]
  creates = [c for c in calls if c[2:4] == ["queued-resources", "create"]]
  assert len(creates) == 2 and all("--node-id=jp" in c and "--spot" in c for c in creates)
  assert "SUSPENDED; deleting and recreating" in out
  assert open(f"{wd}/ckpt-worker-0").read() == "5"


def test_supervise_relaunches_failed_jobs_up_to_max_failures(fake_cloud, stub_repo, tmp_path):
  # Two crashes with one relaunch allowed: gives up, logs fetched for the post-mortem.
  rc, out, wd = _supervise(fake_cloud, stub_repo, tmp_path, "--max_failures=1",
                           config="steps=10,fail_times=2")
  assert rc == 1 and "(failure 2/1); giving up" in out
  assert "stub: simulated crash" in open(tmp_path / "logs" / "worker-0.log").read()
  # A new supervisor attaches to the same TPU, sees the failed job, relaunches it (the stub
  # now gets past its crashes) and finishes without recreating anything.
  rc, out, wd = _supervise(fake_cloud, stub_repo, tmp_path, config="steps=10,fail_times=2")
  assert rc == 0, out
  assert "workers: exited 3" in out and "failure 1/3" in out and "training finished" in out
  verbs = fake_cloud.verbs()
  assert verbs.count("tpu-vm create") == 1 and "tpu-vm delete" not in verbs   # same VM
  assert open(f"{wd}/ckpt-worker-0").read() == "10"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("gcloud"), reason="needs the Cloud SDK")
def test_the_real_gcloud_accepts_every_command(tmp_path):
  """Each command line parsed by the installed gcloud, stopped before any request: an empty
  config dir (no account), no GCE metadata credentials, and the TPU API pointed at a dead port
  even if something were authenticated."""
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path), CLOUDSDK_CORE_DISABLE_PROMPTS="1",
             CLOUDSDK_CORE_CHECK_GCE_METADATA="false",
             CLOUDSDK_API_ENDPOINT_OVERRIDES_TPU="http://127.0.0.1:9/")
  vm, qr = gcloud.Target("jp", "us-east5-a", "proj"), gcloud.Target("jp", "us-east5-a", "p", True)
  argvs = [gcloud.create(vm, "v5p-64", "v2-alpha-tpuv5", p) for p in ("on-demand", "spot",
                                                                        "reserved")]
  argvs += [gcloud.create(qr, "v6e-16", "v2-alpha-tpuv6e", "spot", ("--valid-until-duration=6h",)),
            gcloud.describe_state(vm), gcloud.describe_state(qr), gcloud.delete(vm),
            gcloud.delete(qr), gcloud.ssh(vm, remote.status_script(), output_dir=str(tmp_path)),
            gcloud.scp_to(vm, __file__, remote.TARBALL),
            gcloud.scp_from(vm, remote.LOG, str(tmp_path / "w.log"), 3)]
  for argv in argvs:
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert "do not currently have an active account" in res.stderr, (argv, res.stderr)
