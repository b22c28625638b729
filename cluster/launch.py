"""Start scripts/train.py on several GPU machines (or several processes on this one) over ssh.

  python cluster/launch.py --hosts=gpu01,gpu02 --remote_dir=/shared/jpost -- \\
      --config=configs/dpo.py:model=llama3_8b --workdir=/shared/runs/dpo --config.mesh.fsdp=16
  python cluster/launch.py --hosts=gpu01,gpu02 --procs_per_host=8 ...   # one process per GPU
  python cluster/launch.py --local=2 -- --config=configs/sft.py --workdir=runs/two-proc  # CPU

Process i gets JPOST_COORDINATOR_ADDRESS=<first host>:<port>, JPOST_NUM_PROCESSES and
JPOST_PROCESS_ID (and JPOST_LOCAL_DEVICE_IDS=<its GPU> with --procs_per_host > 1), which
jpost/train/distributed.py turns into `jax.distributed.initialize(...)`. Each process's output
goes to <logs_dir>/process-<i>.log; process 0's is also echoed here. When one process fails the
others are stopped, since the rest would wait in a collective forever. Under SLURM use
cluster/jpost.sbatch instead: srun starts the processes and jpost reads SLURM's variables.
"""
import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid


def parse_args(argv):
  argv = list(argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  where = p.add_mutually_exclusive_group(required=True)
  where.add_argument("--hosts", help="comma-separated ssh hosts; the first one coordinates")
  where.add_argument("--hostfile", help="one ssh host per line (# comments allowed)")
  where.add_argument("--local", type=int, metavar="N", help="N processes on this machine")
  p.add_argument("--procs_per_host", type=int, default=1,
                 help="1: one process drives all GPUs of its host; #GPUs: one per GPU")
  p.add_argument("--coordinator", help="host:port process 0 listens on (default: first "
                                       "host, --port); must be reachable from every host")
  p.add_argument("--port", type=int, default=12355)
  p.add_argument("--remote_dir", default=os.getcwd(),
                 help="jpost checkout on the hosts (same path everywhere, e.g. a shared FS)")
  p.add_argument("--python", default="python", help="interpreter on the hosts (a venv path)")
  p.add_argument("--script", default="scripts/train.py", help="relative to --remote_dir")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for every process")
  p.add_argument("--ssh", default="ssh -o BatchMode=yes", help="ssh command prefix")
  p.add_argument("--logs_dir", default=os.path.join("logs", "cluster"))
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args = p.parse_args(argv)
  args.train_args = train_args
  if args.local:
    args.host_list = ["localhost"] * args.local
    args.procs_per_host = 1
  else:
    text = args.hosts.replace(",", "\n") if args.hosts else open(args.hostfile).read()
    args.host_list = [h.split("#")[0].strip() for h in text.splitlines()
                      if h.split("#")[0].strip()]
    if not args.host_list:
      p.error("no hosts given")
  if args.procs_per_host < 1:
    p.error("--procs_per_host must be >= 1")
  for kv in args.env:
    if "=" not in kv:
      p.error(f"--env {kv!r}: expected KEY=VALUE")
  return args


def plan(args):
  """[(host, process_id, env)] for every process, in process-id order."""
  coordinator = args.coordinator or f"{args.host_list[0]}:{args.port}"
  n = len(args.host_list) * args.procs_per_host
  out = []
  for h, host in enumerate(args.host_list):
    for r in range(args.procs_per_host):
      pid = h * args.procs_per_host + r
      env = {"JPOST_COORDINATOR_ADDRESS": coordinator, "JPOST_NUM_PROCESSES": str(n),
             "JPOST_PROCESS_ID": str(pid)}
      if args.procs_per_host > 1:
        env["JPOST_LOCAL_DEVICE_IDS"] = str(r)
      env.update(kv.split("=", 1) for kv in args.env)
      out.append((host, pid, env))
  return out


def command(args, env, pid_file) -> str:
  """The shell line one process runs (remotely through ssh, or locally)."""
  exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  # $$ is the shell that `exec` turns into python: the pid file is the trainer's pid, which is
  # what --abort kills on the remote side (killing the local ssh client would not).
  return (f"cd {shlex.quote(args.remote_dir)} && echo $$ > {shlex.quote(pid_file)} && "
          f"exec env {exports} {shlex.quote(args.python)} {shlex.quote(args.script)} "
          + shlex.join(args.train_args))


def _pump(stream, path, echo_prefix):
  with open(path, "w") as f:
    for line in stream:
      f.write(line)
      f.flush()
      if echo_prefix is not None:
        sys.stdout.write(echo_prefix + line)
        sys.stdout.flush()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  run_id = uuid.uuid4().hex[:8]
  procs = []
  if not args.dry_run:
    os.makedirs(args.logs_dir, exist_ok=True)
  for host, pid, env in plan(args):
    pid_file = f"/tmp/jpost-{run_id}-{pid}.pid"
    line = command(args, env, pid_file)
    argv = ["bash", "-c", line] if args.local else [*shlex.split(args.ssh), host, line]
    print("+ " + shlex.join(argv), flush=True)
    if args.dry_run:
      continue
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    log = os.path.join(args.logs_dir, f"process-{pid}.log")
    t = threading.Thread(target=_pump, args=(p.stdout, log, "[0] " if pid == 0 else None),
                         daemon=True)
    t.start()
    procs.append((host, pid, pid_file, p, t))
  if args.dry_run:
    return 0
  return _wait(args, procs)


def _wait(args, procs) -> int:
  """Waits for all; on the first failure stops the rest and returns its exit code."""
  failed = None
  try:
    while failed is None and any(p.poll() is None for *_, p, _ in procs):
      failed = next((pid for _, pid, _, p, _ in procs if p.poll() not in (None, 0)), None)
      time.sleep(0.2)
    failed = failed if failed is not None else next(
        (pid for _, pid, _, p, _ in procs if p.returncode), None)
  except KeyboardInterrupt:
    failed = -1
  if failed is not None:
    print(f"cluster: process {failed} failed; stopping the others "
          f"(logs: {args.logs_dir}/process-*.log)", flush=True)
    for host, pid, pid_file, p, _ in procs:
      if p.poll() is None:
        _stop(args, host, pid_file, p)
  for *_, p, t in procs:
    p.wait()
    t.join(timeout=5)
  codes = [p.returncode for *_, p, _ in procs]
  print(f"cluster: exit codes {codes}; logs in {args.logs_dir}", flush=True)
  if args.local:                      # remote hosts keep theirs in /tmp (one small file each)
    for _, _, pid_file, _, _ in procs:
      if os.path.exists(pid_file):
        os.remove(pid_file)
  if failed is None:
    return 0
  return 130 if failed == -1 else codes[failed]   # the culprit's code, not the stopped ones


def _stop(args, host, pid_file, p):
  if args.local:
    os.killpg(p.pid, signal.SIGTERM)
  else:
    subprocess.run([*shlex.split(args.ssh), host,
                    f"kill -TERM $(cat {shlex.quote(pid_file)}) 2>/dev/null"], check=False)
  try:
    p.wait(timeout=60)
  except subprocess.TimeoutExpired:
    if args.local:
      os.killpg(p.pid, signal.SIGKILL)
    p.kill()


if __name__ == "__main__":
  sys.exit(main())
