"""Create a Cloud TPU VM or pod slice, install jpost on every worker, train, survive preemption.

  python tpu/launch.py plan      --accelerator_type=v5p-64 --model=llama3_8b
  python tpu/launch.py supervise --name=NAME --zone=ZONE --accelerator_type=v5p-64 --spot \\
      --mount_bucket=BUCKET --workdir=runs/dpo-llama8b -- \\
      --config=configs/dpo.py:model=llama3_8b --config.mesh.fsdp=32
  python tpu/launch.py {create,setup,launch,status,logs,stop,delete} --name=NAME --zone=ZONE ...

Everything after `--` goes to scripts/train.py on every worker. `--dry_run` prints each command
instead of running it. See tpu/README.md for topologies, meshes and the preemption loop.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tpu import gcloud, remote, topology  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("plan", "create", "setup", "launch", "status", "logs", "stop", "delete", "supervise")


def parse_args(argv):
  argv = list(argv)
  train_args = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
  p.add_argument("command", choices=COMMANDS)
  p.add_argument("--name", help="TPU VM (and queued resource) name")
  p.add_argument("--zone")
  p.add_argument("--project", help="default: gcloud's configured project")
  p.add_argument("--accelerator_type", required=True, help="v5litepod-16, v5p-64, v6e-8, ...")
  p.add_argument("--runtime_version", help="default: the JAX image for the generation")
  p.add_argument("--spot", action="store_true", help="Spot capacity (preemptible, cheaper)")
  p.add_argument("--reserved", action="store_true", help="use the project's reservation")
  p.add_argument("--queued", action="store_true",
                 help="create through a queued resource (waits for capacity)")
  p.add_argument("--create_flag", action="append", default=[],
                 help="extra flag for the create command, e.g. --create_flag=--network=NET")
  p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  # setup
  p.add_argument("--source", choices=("tarball", "git"), default="tarball",
                 help="tarball: this checkout (tracked + untracked, not ignored files); "
                      "git: clone --git_url on the workers")
  p.add_argument("--source_dir", default=ROOT, help="checkout to pack (default: this one)")
  p.add_argument("--git_url")
  p.add_argument("--git_ref", default="")
  p.add_argument("--python", default="3.11")
  p.add_argument("--extras", default="tpu")
  p.add_argument("--mount_bucket", help="mount this GCS bucket on every worker (gcsfuse)")
  p.add_argument("--mount_point", default="/mnt/jpost_gcs")
  # launch
  p.add_argument("--workdir", help="train.py --workdir; relative paths go under --mount_point "
                                   "when --mount_bucket is set")
  p.add_argument("--shared_workdir", action="store_true",
                 help="--workdir is already on a filesystem all workers share (NFS, Filestore)")
  p.add_argument("--allow_gs_workdir", action="store_true",
                 help="pass a gs:// --workdir through (only once jpost writes URLs; see README)")
  p.add_argument("--env", action="append", default=[], help="KEY=VALUE for train.py, repeatable")
  # operations
  p.add_argument("--stop_grace", type=int, default=120,
                 help="seconds between SIGTERM (checkpoint at the next step) and SIGKILL")
  p.add_argument("--logs_dir", help="local folder for fetched logs (default logs/NAME)")
  p.add_argument("--follow", action="store_true", help="logs: tail worker 0's log")
  p.add_argument("--poll_seconds", type=float, default=60.0)
  p.add_argument("--max_restarts", type=int, default=100, help="recreations after preemption")
  p.add_argument("--max_failures", type=int, default=3,
                 help="relaunches after the job itself failed (non-zero exit, killed)")
  p.add_argument("--delete_when_done", action="store_true")
  # plan
  p.add_argument("--model", help="plan: llama3_2_1b | llama3_8b | qwen2_5_7b")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--no_ref", action="store_true", help="plan: SFT (no reference model)")
  args = p.parse_args(argv)
  args.train_args = train_args
  args.slice = topology.parse(args.accelerator_type)
  if args.command != "plan" and not (args.name and args.zone):
    p.error(f"{args.command} needs --name and --zone")
  if args.spot and args.reserved:
    p.error("--spot and --reserved are exclusive")
  for kv in args.env:
    if "=" not in kv:
      p.error(f"--env {kv!r}: expected KEY=VALUE")
  return args


def target(args) -> gcloud.Target:
  return gcloud.Target(args.name, args.zone, args.project, args.queued)


def workdir(args) -> str:
  """The --workdir every worker passes to train.py, checked for surviving where it must."""
  if not args.workdir:
    raise SystemExit("launch/supervise need --workdir: relaunches resume from its checkpoints "
                     "(train.py's default is a fresh timestamped folder per start)")
  wd = args.workdir
  if wd.startswith("gs://"):
    if not args.allow_gs_workdir:
      raise SystemExit(
          "--workdir=gs://... : jpost's loop and checkpointer currently treat the workdir as a "
          "local path (os.makedirs/abspath), so a gs:// path would land on each worker's disk. "
          "Use --mount_bucket=BUCKET --workdir=RUN (mounted with gcsfuse), or "
          "--allow_gs_workdir once jpost writes gs:// directly.")
    return wd
  if args.mount_bucket and not os.path.isabs(wd):
    return f"{args.mount_point.rstrip('/')}/{wd}"
  on_mount = args.mount_bucket and wd.startswith(args.mount_point.rstrip("/") + "/")
  if args.slice.hosts > 1 and not (on_mount or args.shared_workdir):
    raise SystemExit(
        f"{args.slice.accelerator_type} has {args.slice.hosts} workers: --workdir={wd} would be "
        f"a different disk on each, and a multi-host checkpoint needs one shared path. Use "
        f"--mount_bucket=BUCKET, or --shared_workdir if {wd} is already shared.")
  return wd


def run_create(args, runner):
  runtime = args.runtime_version or args.slice.runtime
  provisioning = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
  runner.run(gcloud.create(target(args), args.slice.accelerator_type, runtime, provisioning,
                           tuple(args.create_flag)))


def pack(root: str, out: str) -> int:
  """Tarball of the checkout as git sees it (tracked + untracked, minus .gitignore'd files)."""
  names = subprocess.run(["git", "-C", root, "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True, text=True).stdout.split("\0")
  count = 0
  with tarfile.open(out, "w:gz") as tar:
    for name in filter(None, names):
      path = os.path.join(root, name)
      if os.path.isfile(path):      # listed but deleted in the working tree: skip
        tar.add(path, arcname=name)
        count += 1
  return count


def run_setup(args, runner):
  t = target(args)
  if args.source == "tarball":
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, remote.TARBALL)
      runner.say(f"+ pack {args.source_dir} (git ls-files -co --exclude-standard) -> {out}")
      if not runner.dry_run:
        runner.say(f"  {pack(args.source_dir, out)} files")
      runner.run(gcloud.scp_to(t, out, remote.TARBALL))
  script = remote.install_script(args.source, git_url=args.git_url or "",
                                 git_ref=args.git_ref, python=args.python, extras=args.extras,
                                 mount_bucket=args.mount_bucket or "",
                                 mount_point=args.mount_point)
  runner.run(gcloud.ssh(t, script))


def run_launch(args, runner):
  train_args = [a for a in args.train_args if not a.startswith("--workdir")]
  train_args.append(f"--workdir={workdir(args)}")
  if not any(a.startswith("--config=") for a in train_args):
    raise SystemExit("launch/supervise need the training command after `--`, e.g. "
                     "-- --config=configs/sft.py:model=llama3_2_1b")
  env = dict(kv.split("=", 1) for kv in args.env)
  runner.run(gcloud.ssh(target(args), remote.launch_script(train_args, env)))


def run_stop(args, runner):
  runner.run(gcloud.ssh(target(args), remote.stop_script(args.stop_grace)),
             check=False)


def job_status(args, runner) -> list[str] | None:
  """One status per worker (remote.status_script); None in a dry run."""
  with tempfile.TemporaryDirectory() as tmp:
    runner.run(gcloud.ssh(target(args), remote.status_script(), output_dir=tmp),
               check=False)
    if runner.dry_run:
      return None
    out = []
    for i in range(args.slice.hosts):
      path = os.path.join(tmp, f"{i}.log")
      out.append(remote.parse_status(open(path).read()) if os.path.exists(path) else "unknown")
    return out


def fetch_logs(args, runner):
  folder = args.logs_dir or os.path.join("logs", args.name)
  if not runner.dry_run:
    os.makedirs(folder, exist_ok=True)
  for i in range(args.slice.hosts):
    runner.run(gcloud.scp_from(target(args), remote.LOG, os.path.join(folder, f"worker-{i}.log"),
                               i), check=False)
  runner.say(f"logs: {folder}/worker-*.log")


def run_logs(args, runner):
  if args.follow:   # worker 0 hosts process 0, which prints the metrics lines
    runner.run(gcloud.ssh(target(args), f"tail -n 100 -F $HOME/{remote.LOG}", worker="0"),
               check=False)
  else:
    fetch_logs(args, runner)


def run_status(args, runner):
  state = gcloud.state(runner, target(args))
  runner.say(f"{args.name}: {state}" + (" (dry run: not queried)" if runner.dry_run else ""))
  if state in gcloud.READY:
    for i, s in enumerate(job_status(args, runner) or []):
      runner.say(f"  worker {i}: {s}")


@dataclasses.dataclass
class Counters:
  restarts: int = 0    # recreations after the TPU was lost
  failures: int = 0    # relaunches after the job (or its setup) failed on a live TPU
  errors: int = 0      # consecutive gcloud errors (network, auth): transient until too many
  unreachable: int = 0  # consecutive polls where some worker answered nothing, none running


def supervise(args, runner) -> int:
  """Keeps the job alive: create -> setup -> launch, then poll; recreate when preempted.

  The same --workdir on every (re)launch is what makes a relaunch continue from the last
  checkpoint; this loop only has to bring the TPU and the processes back.
  """
  wd = workdir(args)                  # fail before creating anything
  if (args.spot or args.queued) and not (args.mount_bucket or args.shared_workdir
                                          or wd.startswith("gs://")):
    runner.say(f"supervise: warning: --workdir={wd} is on the VM's disk, which a preemption "
               f"deletes; the relaunch would start over (use --mount_bucket)")
  t, n = target(args), Counters()
  needs_setup, attached = False, False

  def fail(what) -> bool:
    n.failures += 1
    over = n.failures > args.max_failures
    runner.say(f"supervise: {what} (failure {n.failures}/{args.max_failures})"
               + ("; giving up" if over else ""))
    return over

  while True:
    try:
      state = gcloud.state(runner, t)
      n.errors = 0
    except RuntimeError as e:         # gcloud itself failed; the TPU may be fine
      n.errors += 1
      runner.say(f"supervise: {e}")
      if n.errors >= 10:
        return 1
      runner.sleep(args.poll_seconds)
      continue
    if state == gcloud.MISSING or state in gcloud.LOST:
      if state != gcloud.MISSING:
        n.restarts += 1
        if n.restarts > args.max_restarts:
          runner.say(f"supervise: giving up after {args.max_restarts} recreations")
          return 1
        runner.say(f"supervise: {args.name} is {state}; deleting and recreating "
                   f"(restart {n.restarts}/{args.max_restarts})")
        runner.run(gcloud.delete(t), check=False)
      try:
        run_create(args, runner)
      except RuntimeError as e:       # e.g. no capacity right now: try again next poll
        runner.say(f"supervise: {e}")
        runner.sleep(args.poll_seconds)
        continue
      needs_setup, attached = True, True
      if not runner.dry_run:
        continue                      # queued resources become ACTIVE later: poll again
    elif state in gcloud.PENDING:
      runner.say(f"supervise: {args.name} is {state}; waiting")
      runner.sleep(args.poll_seconds)
      continue
    elif state not in gcloud.READY:
      runner.say(f"supervise: {args.name} is {state}, which a person decides about "
                 f"(start or delete it); stopping")
      return 1
    if needs_setup:
      try:
        run_setup(args, runner)
        run_launch(args, runner)
        needs_setup = False
      except RuntimeError as e:       # a VM preempted mid-setup shows up in the next describe
        if fail(f"setup/launch failed: {e}"):
          return 1
        runner.sleep(args.poll_seconds)
        continue
    statuses = job_status(args, runner)
    if runner.dry_run:
      _explain_recovery(args, runner, t)
      return 0
    runner.say(f"supervise: {args.name} {state}; workers: {', '.join(statuses)}")
    if not attached:                  # first look at a TPU this process did not create
      attached = True
      if all(s == "none" for s in statuses):
        needs_setup = True
        continue
    if all(s == "exited 0" for s in statuses):
      fetch_logs(args, runner)
      runner.say("supervise: training finished")
      if args.delete_when_done:
        runner.run(gcloud.delete(t))
      return 0
    failed = [s for s in statuses if s == "dead" or (s.startswith("exited") and s != "exited 0")]
    n.unreachable = n.unreachable + 1 if ("unknown" in statuses
                                          and "running" not in statuses) else 0
    if n.unreachable >= 5:            # a worker that never answers would keep us here forever
      failed.append("unreachable")
      n.unreachable = 0
    stopped = "stopped" in statuses and "running" not in statuses
    if failed or stopped:
      fetch_logs(args, runner)
      if failed and fail(f"the job failed on some workers ({', '.join(failed)}); logs fetched"):
        return 1
      runner.say("supervise: relaunching; train.py resumes from the last checkpoint")
      run_stop(args, runner)          # the other workers may hang in a collective
      try:
        run_launch(args, runner)
      except RuntimeError as e:
        runner.say(f"supervise: relaunch failed: {e}")
    runner.sleep(args.poll_seconds)


def _explain_recovery(args, runner, t):
  runner.say(f"# then every {args.poll_seconds:g}s: the describe and status commands above.\n"
             f"# when the state is PREEMPTED/TERMINATED (TPU VM) or SUSPENDED/FAILED (queued):")
  runner.run(gcloud.delete(t))
  runner.say("#   ... and the create, scp/setup and launch commands above again; train.py finds "
             "the checkpoints in --workdir and resumes.\n"
             "# when a worker's job exits non-zero (at most --max_failures times):")
  run_stop(args, runner)
  runner.say("#   ... and the launch command above again.")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  runner = gcloud.Runner(dry_run=args.dry_run)
  if args.command == "plan":
    print(topology.describe(args.accelerator_type, args.model, seq_len=args.seq_len,
                            param_dtype=args.param_dtype, with_ref=not args.no_ref))
    return 0
  if args.command == "supervise":
    return supervise(args, runner)
  {"create": run_create, "setup": run_setup, "launch": run_launch, "status": run_status,
   "logs": run_logs, "stop": run_stop,
   "delete": lambda a, r: r.run(gcloud.delete(target(a)))}[args.command](args, runner)
  return 0


if __name__ == "__main__":
  sys.exit(main())
