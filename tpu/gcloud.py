"""`gcloud compute tpus` command lines, and a runner that executes them or only prints them.

Every command is built as an argv list by a pure function, so `--dry_run` prints exactly what a
real run executes and tests can compare argv without a cloud project.
"""
import dataclasses
import shlex
import subprocess
import sys
import time

# TPU VM node states (tpu.googleapis.com v2 Node.State) and queued-resource states
# (QueuedResourceState.State), grouped by what the supervisor does about them.
READY = frozenset({"READY", "ACTIVE"})
PENDING = frozenset({"CREATING", "STARTING", "RESTARTING", "REPAIRING", "REIMAGING", "HIDING",
                     "HIDDEN", "UNHIDING", "UNKNOWN", "STATE_UNSPECIFIED", "ACCEPTED",
                     "WAITING_FOR_RESOURCES", "PROVISIONING", "SUSPENDING", "DELETING"})
# Lost for good: the VM (and its boot disk) must be deleted and created again. A spot VM cannot
# be restarted after preemption; a suspended queued resource does not come back on its own.
LOST = frozenset({"PREEMPTED", "TERMINATED", "SUSPENDED", "FAILED"})
# Anything else (STOPPED, STOPPING) was a person's decision: the supervisor stops and says so.
MISSING = "MISSING"   # describe said NOT_FOUND


@dataclasses.dataclass(frozen=True)
class Target:
  """Which TPU: a TPU VM `name`, or a queued resource `name` whose node id is also `name`."""
  name: str
  zone: str
  project: str | None = None
  queued: bool = False

  def flags(self) -> list[str]:
    return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])


_TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
_QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


def create(t: Target, accelerator_type: str, runtime: str, provisioning: str,
           extra: tuple[str, ...] = ()) -> list[str]:
  """provisioning: on-demand | spot | reserved (a reservation the project already holds)."""
  if provisioning not in ("on-demand", "spot", "reserved"):
    raise ValueError(f"provisioning={provisioning!r}: expected on-demand, spot or reserved")
  tier = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[provisioning]
  if t.queued:
    return [*_QUEUED, "create", t.name, f"--node-id={t.name}",
            f"--accelerator-type={accelerator_type}", f"--runtime-version={runtime}",
            *t.flags(), *tier, *extra]
  return [*_TPU_VM, "create", t.name, f"--accelerator-type={accelerator_type}",
          f"--version={runtime}", *t.flags(), *tier, *extra]


def describe_state(t: Target) -> list[str]:
  if t.queued:
    return [*_QUEUED, "describe", t.name, *t.flags(), "--format=value(state.state)"]
  return [*_TPU_VM, "describe", t.name, *t.flags(), "--format=value(state)"]


def delete(t: Target) -> list[str]:
  if t.queued:   # --force deletes the node too; without it a queued resource with a node stays
    return [*_QUEUED, "delete", t.name, *t.flags(), "--force", "--quiet"]
  return [*_TPU_VM, "delete", t.name, *t.flags(), "--quiet"]


def ssh(t: Target, command: str, worker: str = "all", output_dir: str | None = None) -> list[str]:
  """Runs `command` on the workers (concurrently with --worker=all).

  With output_dir, gcloud writes each worker's output to output_dir/<worker>.log instead of
  interleaving it on stdout: that is how per-worker status is read back.
  """
  argv = [*_TPU_VM, "ssh", t.name, *t.flags(), f"--worker={worker}", f"--command={command}",
          "--quiet"]
  if output_dir:
    argv.append(f"--output-directory={output_dir}")
  return argv


def scp_to(t: Target, local: str, remote: str, worker: str = "all") -> list[str]:
  return [*_TPU_VM, "scp", local, f"{t.name}:{remote}", *t.flags(), f"--worker={worker}",
          "--quiet"]


def scp_from(t: Target, remote: str, local: str, worker: int) -> list[str]:
  return [*_TPU_VM, "scp", f"{t.name}:{remote}", local, *t.flags(), f"--worker={worker}",
          "--quiet"]


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str = ""
  stderr: str = ""


def display(argv: list[str]) -> str:
  """The argv as a shell line; a multi-line --command=SCRIPT becomes a quoted heredoc.

  Pasting the line into bash reproduces argv exactly (tests check that), and the script stays
  readable instead of drowning in nested quote escapes.
  """
  parts = []
  for a in argv:
    if (a.startswith("--command=") and "\n" in a and not a.endswith("\n")
        and "\nJPOST_CMD\n" not in a + "\n"):
      parts.append("--command=\"$(cat <<'JPOST_CMD'\n" + a[len("--command="):] + "\nJPOST_CMD\n)\"")
    else:
      parts.append(shlex.quote(a))
  return " ".join(parts)


class Runner:
  """Runs commands, or with dry_run prints them (`+ cmd`) and pretends they succeeded."""

  def __init__(self, dry_run: bool = False, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def say(self, text: str):
    print(text, file=self.out, flush=True)

  def run(self, argv, *, capture=False, check=True, shell=False) -> Result:
    self.say("+ " + (argv if shell else display(argv)))
    if self.dry_run:
      return Result(0)
    proc = subprocess.run(argv, shell=shell, text=True,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)
    if check and proc.returncode:
      detail = f":\n{proc.stderr.strip()}" if capture and proc.stderr else ""
      raise RuntimeError(f"command failed with exit code {proc.returncode}: "
                         f"{argv if shell else shlex.join(argv)}{detail}")
    return Result(proc.returncode, proc.stdout or "", proc.stderr or "")

  def sleep(self, seconds: float):
    if not self.dry_run and seconds > 0:
      time.sleep(seconds)


def state(runner: Runner, t: Target) -> str:
  """The node / queued-resource state, MISSING when it does not exist.

  Other failures (auth, network) raise: treating them as MISSING would create a second TPU.
  """
  res = runner.run(describe_state(t), capture=True, check=False)
  if runner.dry_run:
    return MISSING   # a dry run shows the path from nothing to a running job
  if res.returncode:
    if "NOT_FOUND" in res.stderr or "not found" in res.stderr.lower():
      return MISSING
    raise RuntimeError(f"gcloud describe failed (exit {res.returncode}): {res.stderr.strip()}")
  value = res.stdout.strip().upper()
  return value or MISSING
