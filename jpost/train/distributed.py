"""Multi-process start-up: which processes form one JAX job, read from the launcher's environment.

`resolve(env)` is pure (a mapping in, a `Plan` out) so every launcher's variables can be tested
without starting a runtime; `maybe_initialize()` applies the plan before any backend is touched.
Sources, first match wins:

1. Explicit (cluster/launch.py, hand-written scripts, any scheduler):
   JPOST_COORDINATOR_ADDRESS=host:port (or JAX_COORDINATOR_ADDRESS), JPOST_NUM_PROCESSES,
   JPOST_PROCESS_ID, optionally JPOST_LOCAL_DEVICE_IDS=0,1. All three or none: a partial set is
   an error, because the alternative (silently training single-process) wastes the allocation.
2. SLURM, inside `srun`: SLURM_PROCID / SLURM_STEP_NUM_TASKS (else SLURM_NTASKS); the
   coordinator is the first host of SLURM_STEP_NODELIST (else SLURM_JOB_NODELIST), port
   JPOST_COORDINATOR_PORT or one derived from the job id so concurrent jobs on a node differ.
3. Cloud TPU: JPOST_DISTRIBUTED=tpu (the tpu/ launcher sets it) or TPU chips on this machine ->
   `jax.distributed.initialize()` with no arguments; JAX reads the slice's workers from the
   TPU VM metadata server.

JPOST_DISTRIBUTED=off disables all of it (e.g. a one-process debug run inside an allocation).
"""
import dataclasses
import os
import re
import sys
from collections.abc import Mapping

_ADDRESS_KEYS = ("JPOST_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_EXPLICIT = ("coordinator address (JPOST_COORDINATOR_ADDRESS or JAX_COORDINATOR_ADDRESS)",
             "JPOST_NUM_PROCESSES", "JPOST_PROCESS_ID")
# JAX's own SLURM default: a port in the top 4096 of the range, picked by job id.
_PORT_BASE, _PORT_SPAN = 65536 - 4096, 4096


class DistributedConfigError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the job. kind: none | explicit | slurm | tpu."""
  kind: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None
  note: str = ""  # why nothing is initialised, when that could surprise the user

  def initialize_kwargs(self) -> dict:
    if self.kind == "tpu":
      return {}   # auto-detection from the TPU metadata server
    kw = dict(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
              process_id=self.process_id,
              # We resolved everything ourselves: JAX's SLURM detection would otherwise still
              # pin local_device_ids=[SLURM_LOCALID], i.e. one GPU per process even when one
              # process drives all GPUs of its node.
              cluster_detection_method="deactivate")
    if self.local_device_ids is not None:
      kw["local_device_ids"] = list(self.local_device_ids)
    return kw


def _int(env, key, *, minimum=0):
  raw = env[key].strip()
  if not re.fullmatch(r"\d+", raw) or int(raw) < minimum:
    raise DistributedConfigError(f"{key}={env[key]!r}: expected an integer >= {minimum}")
  return int(raw)


def _device_ids(raw: str, key: str) -> tuple[int, ...]:
  parts = [p.strip() for p in raw.split(",") if p.strip()]
  if not parts or not all(p.isdigit() for p in parts):
    raise DistributedConfigError(f"{key}={raw!r}: expected comma-separated device ids like 0,1")
  return tuple(int(p) for p in parts)


def _check_address(address: str, source: str) -> str:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedConfigError(f"{source}={address!r}: expected host:port, e.g. node001:12345")
  return address


def _check_ids(num, pid, source):
  if num < 1:
    raise DistributedConfigError(f"{source}: the number of processes must be >= 1, got {num}")
  if pid >= num:
    raise DistributedConfigError(f"{source}: process id {pid} is out of range for {num} "
                                 f"processes (ids are 0..{num - 1})")


def first_host(nodelist: str) -> str:
  """The first host of a SLURM hostlist: 'gpu[003-004,010],cpu1' -> 'gpu003'.

  Handles several bracket groups ('r[1-2]-n[07-08]' -> 'r1-n07') and keeps zero padding,
  since the padded name is the resolvable one.
  """
  nodelist = nodelist.strip()
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):   # first top-level comma ends the first host pattern
    depth += {"[": 1, "]": -1}.get(ch, 0)
    if ch == "," and depth == 0:
      end = i
      break
  pattern = nodelist[:end]
  # Each [a-b,c] group contributes its first value.
  host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), pattern)
  if not host or "[" in host or "]" in host:
    raise DistributedConfigError(f"cannot parse the SLURM node list {nodelist!r}")
  return host


def _max_tasks_per_node(spec: str) -> int:
  """'4(x2),3' -> 4: SLURM's compressed tasks-per-node list."""
  counts = [int(m.group(1)) for m in re.finditer(r"(\d+)(?:\(x\d+\))?", spec)]
  return max(counts, default=1)


def _explicit(env):
  address = next((env[k] for k in _ADDRESS_KEYS if env.get(k)), None)
  values = (address, env.get("JPOST_NUM_PROCESSES"), env.get("JPOST_PROCESS_ID"))
  if not any(values):
    return None
  if not all(values):
    given = [n for n, v in zip(_EXPLICIT, values) if v]
    missing = [n for n, v in zip(_EXPLICIT, values) if not v]
    raise DistributedConfigError(
        f"incomplete multi-process settings: {', '.join(given)} set but {', '.join(missing)} "
        f"missing. Set all three (see cluster/README.md) or none of them.")
  source = next(k for k in _ADDRESS_KEYS if env.get(k))
  num = _int(env, "JPOST_NUM_PROCESSES", minimum=1)
  pid = _int(env, "JPOST_PROCESS_ID")
  _check_ids(num, pid, "JPOST_NUM_PROCESSES/JPOST_PROCESS_ID")
  return Plan("explicit", _check_address(address, source), num, pid)


def _slurm(env):
  if "SLURM_JOB_ID" not in env or "SLURM_PROCID" not in env:
    return None
  in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
  count_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  if count_key not in env:
    return None
  num = _int(env, count_key, minimum=1)
  if not in_step:
    # The batch script itself also carries SLURM_PROCID=0 and SLURM_NTASKS=N; initialising
    # there would wait forever for N-1 processes that were never started.
    note = (f"SLURM_NTASKS={num} but this process was not started by srun; running as one "
            f"process (launch with `srun python scripts/train.py ...`)") if num > 1 else ""
    return Plan("none", note=note)
  if num == 1:
    return Plan("none")
  pid = _int(env, "SLURM_PROCID")
  _check_ids(num, pid, f"{count_key}/SLURM_PROCID")
  nodes_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                    if env.get(k)), None)
  if nodes_key is None:
    raise DistributedConfigError("SLURM step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: "
                                 "cannot choose a coordinator; set JPOST_COORDINATOR_ADDRESS")
  port_key = next((k for k in ("JPOST_COORDINATOR_PORT", "JAX_COORDINATOR_PORT") if env.get(k)),
                  None)
  if port_key:
    port = _int(env, port_key, minimum=1)
  else:
    port = _PORT_BASE + _int(env, "SLURM_JOB_ID") % _PORT_SPAN
  local_ids = None
  tasks_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or "1"
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  # One process per GPU: each task takes device SLURM_LOCALID, unless srun already narrowed
  # the task to a single visible GPU (--gpus-per-task=1), where that GPU is local device 0.
  if _max_tasks_per_node(tasks_spec) > 1 and len(visible) != 1 and "SLURM_LOCALID" in env:
    local_ids = (_int(env, "SLURM_LOCALID"),)
  return Plan("slurm", _check_address(f"{first_host(env[nodes_key])}:{port}", nodes_key),
              num, pid, local_ids)


def resolve(env: Mapping[str, str] | None = None, *, on_cloud_tpu: bool = False) -> Plan:
  """The start-up plan for this process from its environment (no side effects)."""
  env = os.environ if env is None else env
  mode = env.get("JPOST_DISTRIBUTED", "auto").strip().lower()
  if mode not in ("auto", "off", "tpu"):
    raise DistributedConfigError(f"JPOST_DISTRIBUTED={mode!r}: expected auto, off or tpu")
  if mode == "off":
    return Plan("none")
  plan = _explicit(env) or _slurm(env)
  if mode == "tpu" and plan is not None and plan.kind != "none":
    raise DistributedConfigError(
        f"JPOST_DISTRIBUTED=tpu but {plan.kind} multi-process settings are also present; "
        f"unset one of them")
  if mode == "tpu" or (plan is None and on_cloud_tpu):
    plan = Plan("tpu")
  plan = plan or Plan("none")
  if env.get("JPOST_LOCAL_DEVICE_IDS") and plan.kind in ("explicit", "slurm"):
    plan = dataclasses.replace(plan, local_device_ids=_device_ids(
        env["JPOST_LOCAL_DEVICE_IDS"], "JPOST_LOCAL_DEVICE_IDS"))
  return plan


def _on_cloud_tpu_vm() -> bool:
  """TPU chips on the PCI bus (what JAX itself checks), without initialising a backend."""
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # private API: a JAX without it simply gets no auto-detection
    return False


def maybe_initialize() -> bool:
  """Initialises the multi-controller runtime if this process is one of several."""
  plan = resolve(on_cloud_tpu=_on_cloud_tpu_vm())
  if plan.note:
    print(f"jpost: {plan.note}", file=sys.stderr, flush=True)
  if plan.kind == "none":
    return False
  import jax
  jax.distributed.initialize(**plan.initialize_kwargs())
  return True
