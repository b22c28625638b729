"""Fixtures for the launcher tests: the repo root on sys.path, a fake `gcloud` and `uv` on PATH."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
  sys.path.insert(0, REPO)   # tpu/ and cluster/ are scripts folders, not installed packages

HERE = os.path.dirname(os.path.abspath(__file__))

# A training script with the two behaviours the supervisor relies on: resume from what the
# workdir holds, and on SIGTERM save, print loop.py's marker and exit 0.
STUB_TRAIN = r'''
import os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
opts = dict(kv.split("=") for kv in args["config"].split(":", 1)[1].split(","))
wd, me = args["workdir"], os.path.basename(os.environ["HOME"])
os.makedirs(wd, exist_ok=True)
ckpt = os.path.join(wd, f"ckpt-{me}")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
with open(os.path.join(wd, f"starts-{me}"), "a") as f:
  f.write(f"{start}\n")
print(f"stub train on {me}: JPOST_DISTRIBUTED={os.environ.get('JPOST_DISTRIBUTED')} "
      f"EXTRA={os.environ.get('EXTRA')} from step {start}", flush=True)
term = []
signal.signal(signal.SIGTERM, lambda *a: term.append(1))
marker = os.path.join(wd, f"failures-{me}")
failures = int(open(marker).read()) if os.path.exists(marker) else 0
if failures < int(opts.get("fail_times", "0")):
  open(marker, "w").write(str(failures + 1))
  print("stub: simulated crash", flush=True)
  sys.exit(3)
steps = int(opts["steps"])
def save(step):
  with open(ckpt + ".tmp", "w") as f:
    f.write(str(step))
  os.replace(ckpt + ".tmp", ckpt)
for step in range(start + 1, steps + 1):
  time.sleep(float(opts.get("dt", "0.02")))
  if step % 5 == 0 or term:
    save(step)
  if term:
    print(f"SIGTERM: saved step {step} to {wd}; exiting cleanly", flush=True)
    sys.exit(0)
save(steps)
print("stub: finished", flush=True)
'''


class FakeCloud:
  def __init__(self, root):
    self.root = root

  def set(self, **kw):
    path = os.path.join(self.root, "state.json")
    st = json.load(open(path)) if os.path.exists(path) else dict(
        exists=False, state="", workers=1, queued=False, describe_calls=0, preempt_at=-1)
    st.update(kw)
    json.dump(st, open(path, "w"))

  def calls(self) -> list[list[str]]:
    path = os.path.join(self.root, "calls.jsonl")
    return [json.loads(l) for l in open(path)] if os.path.exists(path) else []

  def verbs(self) -> list[str]:
    """'tpu-vm describe', 'tpu-vm ssh', ... in call order."""
    return [f"{c[2]} {c[3]}" for c in self.calls()]

  def home(self, i):
    return os.path.join(self.root, f"worker-{i}")


@pytest.fixture
def fake_cloud(tmp_path, monkeypatch):
  root = tmp_path / "cloud"
  bin_dir = tmp_path / "bin"
  root.mkdir()
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(
      # -S: stdlib only, starts faster (the supervisor tests make dozens of calls).
      f"#!/bin/sh\nexec {sys.executable} -S {os.path.join(HERE, 'fake_gcloud.py')} \"$@\"\n")
  # `uv venv DIR` -> DIR/bin/python is this interpreter; `uv pip ...` is only recorded.
  (bin_dir / "uv").write_text(
      "#!/bin/sh\n"
      "case \"$1\" in\n"
      "  venv) for last; do :; done; mkdir -p \"$last/bin\"; "
      f"ln -sf {sys.executable} \"$last/bin/python\";;\n"
      "  pip) echo \"uv $*\" >> \"$FAKE_GCLOUD_DIR/uv.log\";;\n"
      "esac\n")
  for f in ("gcloud", "uv"):
    (bin_dir / f).chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(root))
  cloud = FakeCloud(str(root))
  cloud.set()
  return cloud


@pytest.fixture
def stub_repo(tmp_path):
  """A git checkout whose scripts/train.py is STUB_TRAIN (what --source_dir ships)."""
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  (repo / "scripts" / "train.py").write_text(STUB_TRAIN)
  (repo / "pyproject.toml").write_text("[project]\nname = 'stub'\n")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  return str(repo)
