"""Shell scripts run on every TPU worker (through `gcloud ... ssh --worker=all --command=`).

They are POSIX sh (no bash-isms outside an explicit `bash -c`), so the worker's login shell,
whatever it is, runs them as written.

Layout on each worker, relative to $HOME (identical on all workers, so one command serves all):
  jpost/               the code (unpacked tarball or git checkout)
  jpost_venv/          Python >= 3.11 virtualenv with `pip install -e jpost[tpu]`
  jpost_run/train.log  this worker's stdout+stderr, appended across relaunches
  jpost_run/pid        process-group leader of the running job
  jpost_run/exit_code  written when the job ends (absent while running or after a kill -9)
"""
import shlex

CODE_DIR = "jpost"
VENV = "jpost_venv"
RUN_DIR = "jpost_run"
LOG = f"{RUN_DIR}/train.log"
TARBALL = "jpost.tar.gz"
STATUS_TAG = "JPOST_STATUS"
LAUNCH_MARK = "=== jpost launch"
# What jpost/train/loop.py prints after saving on SIGTERM: a clean exit that is not the end.
SIGTERM_MARK = "SIGTERM: saved step"

_GCSFUSE_APT = (
    'if ! command -v gcsfuse >/dev/null; then\n'
    '  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
    'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" '
    '| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null\n'
    '  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg '
    '| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null\n'
    '  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse\n'
    'fi\n')


# kill -0 also succeeds for a zombie, which an exited job stays until its new parent reaps it.
_ALIVE = ('alive() { kill -0 "$1" 2>/dev/null && '
          '[ "$(ps -o stat= -p "$1" 2>/dev/null | cut -c1)" != Z ]; }')


def install_script(source: str, *, git_url: str = "", git_ref: str = "", python: str = "3.11",
                   extras: str = "tpu", mount_bucket: str = "", mount_point: str = "") -> str:
  lines = ["set -eu", 'cd "$HOME"']
  if source == "tarball":
    lines += [f'rm -rf "$HOME/{CODE_DIR}" && mkdir -p "$HOME/{CODE_DIR}"',
              f'tar -xzf "$HOME/{TARBALL}" -C "$HOME/{CODE_DIR}"']
  elif source == "git":
    if not git_url:
      raise ValueError("--source=git needs --git_url")
    lines += [f'rm -rf "$HOME/{CODE_DIR}"',
              f'git clone --quiet {shlex.quote(git_url)} "$HOME/{CODE_DIR}"']
    if git_ref:
      lines.append(f'git -C "$HOME/{CODE_DIR}" checkout --quiet {shlex.quote(git_ref)}')
  else:
    raise ValueError(f"source={source!r}: expected tarball or git")
  # TPU runtime images ship the distribution's Python (3.10 on Ubuntu 22.04) and jpost needs
  # >= 3.11: uv fetches a standalone CPython into the venv without touching the system one.
  lines += [
      'export PATH="$HOME/.local/bin:$PATH"',
      "command -v uv >/dev/null || python3 -m pip install --user --quiet uv "
      "|| (curl -LsSf https://astral.sh/uv/install.sh | sh)",
      f'[ -x "$HOME/{VENV}/bin/python" ] || uv venv --quiet --python {shlex.quote(python)} '
      f'"$HOME/{VENV}"',
      f'uv pip install --quiet --python "$HOME/{VENV}/bin/python" '
      f'-e "$HOME/{CODE_DIR}[{extras}]"',
      # Metadata, not `import jax`: importing would bring up libtpu on every worker at once.
      # -I: the installed package, not a `jpost/` folder in the current directory.
      f'"$HOME/{VENV}/bin/python" -I -c "import importlib.metadata as m, jpost; '
      f'print(\'jpost installed; jax\', m.version(\'jax\'))"',
  ]
  if mount_bucket:
    # Cloud Storage FUSE: one path that every worker (and the next VM after a preemption) sees.
    # rename-dir-limit lets orbax's commit-by-rename work on flat buckets (non-atomic there;
    # a hierarchical-namespace bucket renames folders atomically).
    mp = shlex.quote(mount_point)
    # Inside the `if`: once mounted, the folder belongs to FUSE and even root's chown fails.
    lines += [_GCSFUSE_APT.rstrip("\n"),
              f"if ! mountpoint -q {mp}; then",
              # Owned by the ssh user, so train.py writes there without sudo.
              f'  sudo mkdir -p {mp} && sudo chown "$(id -u):$(id -g)" {mp}',
              f"  gcsfuse --implicit-dirs --rename-dir-limit=200000 "
              f"{shlex.quote(mount_bucket)} {mp}",
              "fi"]
  return "\n".join(lines)


def launch_script(train_args: list[str], env: dict[str, str]) -> str:
  """Starts scripts/train.py detached (setsid + nohup) so it outlives the ssh session."""
  exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(env.items()))
  run_sh = (f'cd "$HOME/{CODE_DIR}"\n'
            # The tpu/ launcher is the coordinator-free path: JAX reads the slice's workers from
            # the TPU metadata server (jpost/train/distributed.py).
            "export JPOST_DISTRIBUTED=tpu\n" + exports +
            f'exec "$HOME/{VENV}/bin/python" scripts/train.py ' + shlex.join(train_args) + "\n")
  run = f'"$HOME/{RUN_DIR}"'
  return "\n".join([
      "set -eu",
      _ALIVE,
      f"mkdir -p {run}",
      f'if [ -f {run}/pid ] && alive "$(cat {run}/pid)"; then',
      f'  echo "jpost: a run is still active on $(hostname) (pid $(cat {run}/pid)); '
      f'stop it first" >&2; exit 3',
      "fi",
      f"rm -f {run}/exit_code {run}/pid",
      f"cat > {run}/run.sh <<'JPOST_RUN_EOF'\n{run_sh}JPOST_RUN_EOF",
      f'echo "{LAUNCH_MARK} $(date -u +%FT%TZ) on $(hostname)" >> {run}/train.log',
      # $$ inside the new session is the process-group id that `stop` signals. The wrapper
      # traps TERM (a handler, which exec resets, unlike an ignore, which python would inherit)
      # so it outlives the group-wide SIGTERM and still records the trainer's exit code.
      "setsid nohup bash -c " + shlex.quote(
          f'echo $$ > "$HOME/{RUN_DIR}/pid"; trap : TERM; bash "$HOME/{RUN_DIR}/run.sh" '
          f'>> "$HOME/{LOG}" 2>&1; echo $? > "$HOME/{RUN_DIR}/exit_code"')
      + " > /dev/null 2>&1 < /dev/null &",
      # Return once the pid is recorded, so a status right after a launch says "running".
      f"for _ in $(seq 100); do [ -f {run}/pid ] && break; sleep 0.1; done",
      'echo "jpost: started on $(hostname)"',
  ])


def status_script() -> str:
  """Prints one `JPOST_STATUS <none|running|stopped|dead|exited N>` line for this worker.

  Liveness is tested before the exit code: a wrapper that is gone has already written its exit
  code (if it got to), so the answer cannot fall between the two checks.
  """
  run = f'"$HOME/{RUN_DIR}"'
  return "\n".join([
      _ALIVE,
      f'if [ -f {run}/pid ] && alive "$(cat {run}/pid)"; then echo "{STATUS_TAG} running"',
      f"elif [ -f {run}/exit_code ]; then",
      f'  code=$(cat {run}/exit_code)',
      f'  if [ "$code" = 0 ] && tac {run}/train.log | sed "/^{LAUNCH_MARK}/q" '
      f'| grep -q "{SIGTERM_MARK}"; then echo "{STATUS_TAG} stopped"',
      f'  else echo "{STATUS_TAG} exited $code"; fi',
      f'elif [ -f {run}/pid ]; then echo "{STATUS_TAG} dead"',
      f'else echo "{STATUS_TAG} none"; fi',
  ])


def stop_script(grace_s: int) -> str:
  """SIGTERM (the loop checkpoints at the next step boundary), then SIGKILL after grace_s."""
  run = f'"$HOME/{RUN_DIR}"'
  return "\n".join([
      _ALIVE,
      f'if [ -f {run}/pid ] && alive "$(cat {run}/pid)"; then',
      f'  pid=$(cat {run}/pid)',
      '  kill -TERM "-$pid" 2>/dev/null || true',   # "-PGID" without "--": dash rejects "--"
      f'  for _ in $(seq {5 * int(grace_s)}); do alive "$pid" || break; sleep 0.2; done',
      '  kill -KILL "-$pid" 2>/dev/null || true',
      '  echo "jpost: stopped the run on $(hostname)"',
      "fi",
  ])


def parse_status(text: str) -> str:
  """The status a worker printed; 'unknown' when its output has no status line (ssh failed)."""
  for line in reversed(text.splitlines()):
    if line.startswith(STATUS_TAG + " "):
      return line[len(STATUS_TAG) + 1:].strip()
  return "unknown"
