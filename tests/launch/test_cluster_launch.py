"""cluster/launch.py: the per-process environments, the ssh lines, failure handling, and (slow)
a real two-process jax.distributed start on this machine through distributed.py."""
import os
import shlex
import socket
import sys

import pytest

from cluster import launch
from jpost.train import distributed

PROBE = r'''
import os, sys
sys.path.insert(0, os.getcwd())
from jpost.train import distributed
assert distributed.maybe_initialize()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
got = multihost_utils.process_allgather(jnp.array([jax.process_index()])).ravel().tolist()
print(f"probe {jax.process_index()}/{jax.process_count()} gathered {got}", flush=True)
'''


def lines(capsys):
  return [shlex.split(l[2:]) for l in capsys.readouterr().out.splitlines() if l.startswith("+ ")]


def test_ssh_commands_per_gpu(capsys):
  assert launch.main(["--hosts=gpu01,gpu02", "--procs_per_host=2", "--remote_dir=/shared/jp",
                      "--python=/venv/bin/python", "--env=XLA_FLAGS=--xla_gpu_x", "--dry_run",
                      "--", "--config=configs/dpo.py", "--workdir=/shared/runs/a b"]) == 0
  cmds = lines(capsys)
  assert [c[3] for c in cmds] == ["gpu01", "gpu01", "gpu02", "gpu02"]
  assert all(c[:3] == ["ssh", "-o", "BatchMode=yes"] for c in cmds)
  remote = cmds[3][4]
  assert remote.startswith("cd /shared/jp && echo $$ > /tmp/jpost-")
  argv = shlex.split(remote.split(" && exec ")[1])
  assert argv[:1] == ["env"] and argv[-4:] == ["/venv/bin/python", "scripts/train.py",
                                               "--config=configs/dpo.py",
                                               "--workdir=/shared/runs/a b"]
  env = dict(a.split("=", 1) for a in argv[1:-4])
  assert env == {"JPOST_COORDINATOR_ADDRESS": "gpu01:12355", "JPOST_NUM_PROCESSES": "4",
                 "JPOST_PROCESS_ID": "3", "JPOST_LOCAL_DEVICE_IDS": "1",
                 "XLA_FLAGS": "--xla_gpu_x"}


def test_every_planned_environment_resolves_to_its_process(tmp_path):
  hostfile = tmp_path / "hosts"
  hostfile.write_text("# the coordinator first\nnode-a\nnode-b  # spare GPUs\n\nnode-c\n")
  args = launch.parse_args([f"--hostfile={hostfile}", "--procs_per_host=4", "--port=2222"])
  planned = launch.plan(args)
  assert len(planned) == 12
  for host, pid, env in planned:
    p = distributed.resolve(env)
    assert (p.kind, p.coordinator_address, p.num_processes, p.process_id) == (
        "explicit", "node-a:2222", 12, pid)
    assert p.local_device_ids == (pid % 4,) and host == ["node-a", "node-b", "node-c"][pid // 4]
  one = launch.plan(launch.parse_args(["--hosts=x,y"]))
  assert all("JPOST_LOCAL_DEVICE_IDS" not in env for *_, env in one)   # all GPUs per process


def test_a_failing_process_stops_the_others(tmp_path):
  script = tmp_path / "job.py"
  script.write_text("import os, sys, time\n"
                    "if os.environ['JPOST_PROCESS_ID'] == '1':\n"
                    "  print('process 1 fails', flush=True); sys.exit(7)\n"
                    "time.sleep(60)\n")
  logs = tmp_path / "logs"
  rc = launch.main(["--local=2", f"--remote_dir={tmp_path}", f"--python={sys.executable}",
                    "--script=job.py", f"--logs_dir={logs}", "--"])
  assert rc == 7      # process 0 (sleeping 60 s) was stopped, not waited for
  assert "process 1 fails" in (logs / "process-1.log").read_text()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_local_processes_really_form_one_jax_job(tmp_path, capsys):
  probe = tmp_path / "probe.py"
  probe.write_text(PROBE)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  rc = launch.main(["--local=2", f"--port={_free_port()}", f"--remote_dir={repo}",
                    f"--python={sys.executable}", f"--script={probe}",
                    f"--logs_dir={tmp_path / 'logs'}", "--env=JAX_PLATFORMS=cpu", "--"])
  assert rc == 0
  for i in range(2):
    assert f"probe {i}/2 gathered [0, 1]" in (tmp_path / "logs" / f"process-{i}.log").read_text()
