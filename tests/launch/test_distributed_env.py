"""jpost/train/distributed.py: launcher environments -> the arguments of jax.distributed.initialize.

`resolve` is pure, so every case runs without starting a runtime; `maybe_initialize` is checked
with jax.distributed.initialize replaced by a recorder.
"""
import pytest

from jpost.train import distributed as d
from jpost.train.distributed import DistributedConfigError, Plan

EXPLICIT = {"JPOST_COORDINATOR_ADDRESS": "10.0.0.1:12355", "JPOST_NUM_PROCESSES": "4",
            "JPOST_PROCESS_ID": "2"}
# What srun exports to task 5 of a 2-node x 4-task step (plus the job's own variables).
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}


def test_nothing_set_is_single_process():
  assert d.resolve({}) == Plan("none")


def test_explicit_settings():
  plan = d.resolve(EXPLICIT)
  assert plan == Plan("explicit", "10.0.0.1:12355", 4, 2)
  assert plan.initialize_kwargs() == dict(coordinator_address="10.0.0.1:12355", num_processes=4,
                                          process_id=2, cluster_detection_method="deactivate")
  alias = dict(EXPLICIT, JAX_COORDINATOR_ADDRESS="h:1")
  del alias["JPOST_COORDINATOR_ADDRESS"]
  assert d.resolve(alias).coordinator_address == "h:1"
  ids = d.resolve(dict(EXPLICIT, JPOST_LOCAL_DEVICE_IDS="0, 3"))
  assert ids.initialize_kwargs()["local_device_ids"] == [0, 3]


@pytest.mark.parametrize("keep", [
    ("JPOST_COORDINATOR_ADDRESS",), ("JPOST_NUM_PROCESSES",), ("JPOST_PROCESS_ID",),
    ("JPOST_COORDINATOR_ADDRESS", "JPOST_NUM_PROCESSES"),
    ("JPOST_COORDINATOR_ADDRESS", "JPOST_PROCESS_ID"),
    ("JPOST_NUM_PROCESSES", "JPOST_PROCESS_ID")])
def test_partial_settings_name_what_is_missing(keep):
  env = {k: v for k, v in EXPLICIT.items() if k in keep}
  with pytest.raises(DistributedConfigError, match="incomplete multi-process settings") as e:
    d.resolve(env)
  for key in EXPLICIT:
    short = key if key != "JPOST_COORDINATOR_ADDRESS" else "coordinator address"
    assert short in str(e.value)
  missing = str(e.value).split(" set but ")[1]
  assert all((k in missing) != (k in keep) for k in ("JPOST_NUM_PROCESSES", "JPOST_PROCESS_ID"))


@pytest.mark.parametrize("change,message", [
    ({"JPOST_PROCESS_ID": "4"}, "out of range for 4 processes"),
    ({"JPOST_NUM_PROCESSES": "0"}, "expected an integer >= 1"),
    ({"JPOST_PROCESS_ID": "two"}, "expected an integer"),
    ({"JPOST_COORDINATOR_ADDRESS": "10.0.0.1"}, "expected host:port"),
    ({"JPOST_COORDINATOR_ADDRESS": "10.0.0.1:99999"}, "expected host:port"),
    ({"JPOST_LOCAL_DEVICE_IDS": "gpu0"}, "comma-separated device ids"),
    ({"JPOST_DISTRIBUTED": "yes"}, "expected auto, off or tpu"),
])
def test_bad_values_fail_clearly(change, message):
  with pytest.raises(DistributedConfigError, match=message):
    d.resolve({**EXPLICIT, **change})


def test_slurm_one_task_per_gpu():
  plan = d.resolve(SRUN)
  # Coordinator: first host of the step, port from the job id (65536 - 4096 + 4242 % 4096).
  assert plan == Plan("slurm", "gpu07:61586", 8, 5, (1,))
  port = d.resolve(dict(SRUN, JPOST_COORDINATOR_PORT="23456")).coordinator_address
  assert port == "gpu07:23456"


def test_slurm_one_task_per_node_sees_all_gpus():
  env = dict(SRUN, SLURM_PROCID="1", SLURM_LOCALID="0", SLURM_NTASKS="2",
             SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)")
  assert d.resolve(env) == Plan("slurm", "gpu07:61586", 2, 1, None)


def test_slurm_gpu_bound_tasks_keep_their_single_visible_gpu():
  # --gpus-per-task=1: srun already narrowed the task to one GPU, which is local device 0.
  assert d.resolve(dict(SRUN, CUDA_VISIBLE_DEVICES="1")).local_device_ids is None


def test_slurm_falls_back_to_the_job_node_list():
  env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
  env["SLURM_JOB_NODELIST"] = "a100-[3,5],b1"
  assert d.resolve(env).coordinator_address.startswith("a100-3:")


def test_slurm_batch_script_without_srun_stays_single_process():
  batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")}
  plan = d.resolve(dict(batch, SLURM_PROCID="0"))
  assert plan.kind == "none" and "not started by srun" in plan.note
  assert d.resolve(dict(SRUN, SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0")) == Plan("none")


def test_explicit_settings_win_over_slurm():
  assert d.resolve({**SRUN, **EXPLICIT}).kind == "explicit"


@pytest.mark.parametrize("nodelist,first", [
    ("node001", "node001"), ("node001,node002", "node001"), ("node[001-004]", "node001"),
    ("node[007,001-003],gpu1", "node007"), ("rack[1-2]-n[07-08]", "rack1-n07"),
    (" gpu[10-11] ", "gpu10")])
def test_first_host(nodelist, first):
  assert d.first_host(nodelist) == first


def test_cloud_tpu():
  assert d.resolve({"JPOST_DISTRIBUTED": "tpu"}) == Plan("tpu")
  assert Plan("tpu").initialize_kwargs() == {}       # JAX asks the TPU metadata server
  assert d.resolve({}, on_cloud_tpu=True) == Plan("tpu")
  assert d.resolve(EXPLICIT, on_cloud_tpu=True).kind == "explicit"
  assert d.resolve({"JPOST_DISTRIBUTED": "off"}, on_cloud_tpu=True) == Plan("none")
  with pytest.raises(DistributedConfigError, match="also present"):
    d.resolve({**EXPLICIT, "JPOST_DISTRIBUTED": "tpu"})


def test_off_ignores_everything():
  assert d.resolve({**SRUN, **EXPLICIT, "JPOST_DISTRIBUTED": "off"}) == Plan("none")


def test_maybe_initialize_passes_the_plan_to_jax(monkeypatch):
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(d, "_on_cloud_tpu_vm", lambda: False)
  for k in list(EXPLICIT) + ["JAX_COORDINATOR_ADDRESS", "JPOST_DISTRIBUTED"]:
    monkeypatch.delenv(k, raising=False)
  for k in [k for k in __import__("os").environ if k.startswith("SLURM_")]:
    monkeypatch.delenv(k)
  assert d.maybe_initialize() is False and calls == []
  for k, v in EXPLICIT.items():
    monkeypatch.setenv(k, v)
  assert d.maybe_initialize() is True
  assert calls == [dict(coordinator_address="10.0.0.1:12355", num_processes=4, process_id=2,
                        cluster_detection_method="deactivate")]
  monkeypatch.delenv("JPOST_PROCESS_ID")
  with pytest.raises(DistributedConfigError, match="JPOST_PROCESS_ID missing"):
    d.maybe_initialize()
