"""A stand-in `gcloud` for the tpu/ launcher tests: records argv, simulates one TPU.

Installed on PATH as `gcloud` by the tests. State lives in $FAKE_GCLOUD_DIR/state.json:
  exists, state, workers, queued, describe_calls, preempt_at (first describe call that may find
  the TPU preempted; -1 never), preempt_when (paths that must exist first, e.g. checkpoints),
  states (canned describe answers consumed first, optional).
Workers are folders $FAKE_GCLOUD_DIR/worker-<i> used as $HOME: `ssh --command` really runs the
script there with `sh -c` (concurrently, like --worker=all), `scp` copies files in and out, and
`delete` or a preemption kills the worker's processes and wipes its folder, as losing the VM
loses its boot disk. Every call is appended to $FAKE_GCLOUD_DIR/calls.jsonl.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

def root():   # read per call: the tests also run main() in-process, after setting the variable
  return os.environ["FAKE_GCLOUD_DIR"]


def load():
  with open(os.path.join(root(), "state.json")) as f:
    return json.load(f)


def save(st):
  with open(os.path.join(root(), "state.json"), "w") as f:
    json.dump(st, f)


def home(i):
  return os.path.join(root(), f"worker-{i}")


def kill_workers(st):
  for i in range(st["workers"]):
    pid_file = os.path.join(home(i), "jpost_run", "pid")
    if os.path.exists(pid_file):
      try:
        os.killpg(int(open(pid_file).read()), signal.SIGKILL)
      except (ProcessLookupError, ValueError):
        pass


def flag(args, name, default=None):
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default


def workers(st, args):
  w = flag(args, "worker", "0")
  return list(range(st["workers"])) if w == "all" else [int(x) for x in w.split(",")]


def main(argv):
  with open(os.path.join(root(), "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  st = load()
  group, verb = argv[2], argv[3]   # compute tpus <tpu-vm|queued-resources> <verb>
  if verb == "describe":
    if not st["exists"]:
      print(f"ERROR: (gcloud.compute.tpus.{group}.describe) NOT_FOUND: Resource "
            f"'projects/p/locations/z/nodes/{argv[4]}' was not found", file=sys.stderr)
      return 1
    st["describe_calls"] += 1
    if st.get("states"):
      st["state"] = st["states"].pop(0)
    due = 0 <= st.get("preempt_at", -1) <= st["describe_calls"]
    if due and all(map(os.path.exists, st.get("preempt_when", []))):  # once, after progress
      kill_workers(st)
      st.update(preempt_at=-1, state="SUSPENDED" if st["queued"] else "PREEMPTED")
    save(st)
    print(st["state"])
    return 0
  if verb == "create":
    if st["exists"]:
      print("ERROR: ALREADY_EXISTS", file=sys.stderr)
      return 1
    for i in range(st["workers"]):
      os.makedirs(home(i), exist_ok=True)
    st.update(exists=True, state="ACTIVE" if st["queued"] else "READY")
    save(st)
    return 0
  if verb == "delete":
    kill_workers(st)
    for i in range(st["workers"]):
      shutil.rmtree(home(i), ignore_errors=True)
    st.update(exists=False, state="")
    save(st)
    return 0
  if verb == "ssh":
    out_dir = flag(argv, "output-directory")
    command = flag(argv, "command")
    procs = []
    for i in workers(st, argv):
      env = dict(os.environ, HOME=home(i))
      procs.append((i, subprocess.Popen(["sh", "-c", command], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
    rc = 0
    for i, p in procs:
      out = p.communicate()[0]
      rc = max(rc, p.returncode)
      if out_dir:
        with open(os.path.join(out_dir, f"{i}.log"), "w") as f:
          f.write(out)
      else:
        sys.stdout.write(out)
    return rc
  if verb == "scp":
    src, dst = [a for a in argv[4:] if not a.startswith("--")]
    for i in workers(st, argv):
      if ":" in dst:      # local -> worker
        shutil.copy(src, os.path.join(home(i), dst.split(":", 1)[1]))
      else:               # worker -> local
        path = os.path.join(home(i), src.split(":", 1)[1])
        if not os.path.exists(path):
          return 1
        shutil.copy(path, dst)
    return 0
  print(f"fake gcloud: unsupported {argv}", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
