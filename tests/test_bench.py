"""scripts/bench_step.py and scripts/bench_torch.py on the tiny shape (CPU, one device): they run
end to end and write complete JSON, the model-FLOP count equals a hand count, `--compare` flags
regressions, and the compiled step does not grow with depth. Nothing here asserts a speed."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from jpost import models
from jpost.train import flops
from jpost.train import sharding

import helpers

bench = helpers.load_script("bench_step")

# XLA:CPU's legacy fusion code generation at LLVM -O0: these tests check values, not speed, and
# it compiles a train step about 5x faster (2 s instead of 12 s of CPU time for the tiny step).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
SMALL_RUN = ["--shapes=tiny", "--batch=2", "--seq=16", "--steps=1", "--warmup=0",
             "--sample_batches=2", "--prompt_len=8", "--new_tokens=3"]


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------

def test_step_flops_add_the_reference_forward():
  cfg = models.ModelConfig(vocab_size=100, d_model=8, num_layers=3, num_heads=4, num_kv_heads=2,
                           head_dim=4, mlp_dim=16)
  # SFT trains on its rows; DPO trains on chosen + rejected and runs the reference on them too.
  assert bench.step_flops(cfg, "sft", 4, 10) == flops.train_flops(cfg, 4, 10)
  assert bench.step_flops(cfg, "dpo", 4, 10) == 4 * flops.forward_flops(cfg, 8, 10)


# ---------------------------------------------------------------------------------------------
# The regression guard
# ---------------------------------------------------------------------------------------------

def _row(objective="sft", batch=8, **times):
  key = dict(shape="tiny", objective=objective, batch=batch, seq=None if objective == "sample"
             else 64, dtype="float32", param_dtype="float32", remat="none", attention="auto",
             impl="auto", devices=1, prompt_len=8 if objective == "sample" else None,
             new_tokens=4 if objective == "sample" else None)
  return {**key, **times}


def test_compare_flags_only_slowdowns_beyond_the_threshold():
  meta = {"device": "cpu"}
  baseline = {"meta": meta, "rows": [
      _row(step_s=1.0, compile_s=10.0, hlo_ops=5000), _row("dpo", step_s=1.0, hlo_ops=6000),
      _row("sample", prefill_s=0.1, generate_s=1.0)]}
  current = [_row(step_s=1.25, compile_s=12.0, hlo_ops=5000),   # 25% slower: flagged
             _row("dpo", step_s=1.05, hlo_ops=6000 * 8),          # within 10%; 8x instructions
             _row("sample", prefill_s=0.1, generate_s=0.5),       # faster
             _row("grpo", step_s=9.0),                            # not in the baseline
             _row(batch=16, step_s=9.0)]                          # another configuration
  checks = bench.compare(meta, current, baseline, threshold=0.10, compile_threshold=0.5)
  flagged = [(c["key"]["objective"], c["field"]) for c in checks if c["regression"]]
  assert flagged == [("sft", "step_s"), ("dpo", "hlo_ops")]
  assert sorted((c["key"]["objective"], c["field"]) for c in checks) == [
      ("dpo", "hlo_ops"), ("dpo", "step_s"), ("sample", "generate_s"), ("sample", "prefill_s"),
      ("sft", "compile_s"), ("sft", "hlo_ops"), ("sft", "step_s")]
  assert math.isclose(checks[0]["ratio"], 1.25)
  relaxed = bench.compare(meta, current, baseline, threshold=0.3, compile_threshold=10)
  assert not any(c["regression"] for c in relaxed)
  with pytest.raises(ValueError, match="not comparable"):
    bench.compare({"device": "NVIDIA H100 80GB HBM3"}, current, baseline, threshold=0.1)


def test_isolated_children_get_this_runs_flags_for_one_configuration():
  argv = ["--shapes", "tiny,llama3_8b", "--json=out.json", "--batch", "4", "--isolate",
          "--compiler_options={\"a\": 1}", "--compare", "base.json", "--seq=64"]
  child = bench._child_argv(argv, "tiny", "dpo", "/tmp/x.json")
  assert child[2:] == ["--batch", "4", '--compiler_options={"a": 1}', "--seq=64",
                       "--shapes=tiny", "--objectives=dpo", "--json=/tmp/x.json", "--no-isolate"]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

def _check_train_row(row, cfg):
  assert set(bench.TRAIN_FIELDS) <= set(row)
  # n/a on CPU: no peak FLOP/s for MFU, no allocator statistics; sampler fields.
  cpu_na = {"mfu", "device_peak_bytes", "prompt_len", "new_tokens"}
  missing = [f for f in bench.TRAIN_FIELDS if row[f] is None and f not in cpu_na]
  assert not missing, missing
  assert row["note"] == ""
  assert row["rows"] == (4 if row["objective"] == "dpo" else 2)
  assert row["tokens_per_step"] == row["rows"] * 16
  assert row["flops_per_step"] == bench.step_flops(cfg, row["objective"], 2, 16)
  assert row["step_s"] > 0 and row["step_s_all"] == [row["step_s"]]
  assert math.isclose(row["tokens_per_s"], row["tokens_per_step"] / row["step_s"])
  assert row["tokens_per_s_per_device"] == row["tokens_per_s"]
  assert 0 < row["lower_s"] < row["compile_s"] and row["hlo_ops"] > 0
  assert row["mem_planned_peak_bytes"] == (row["mem_argument_bytes"] + row["mem_output_bytes"]
                                           - row["mem_alias_bytes"] + row["mem_temp_bytes"])
  assert row["mem_argument_bytes"] > 0 and row["mem_alias_bytes"] > 0   # the state is donated
  # bf16 compute, float32 master weights and Adam moments after real steps.
  assert (row["dtype"], row["param_dtype"]) == ("bfloat16", "float32")
  assert row["param_dtypes"] == ["float32"] and row["opt_state_dtypes"] == ["float32"]
  assert row["skipped_steps"] == 0 and math.isfinite(row["final_loss"])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """One bench_step run of every objective on the tiny shape with the accelerator precision
  policy (bf16 compute, float32 master weights), against a baseline in which the SFT step took
  a nanosecond -> (exit status, the JSON it wrote)."""
  tmp = tmp_path_factory.mktemp("bench")
  baseline = tmp / "baseline.json"
  baseline.write_text(json.dumps({"meta": {"device": "cpu"}, "rows": [_row(
      batch=2, step_s=1e-9) | {"seq": 16, "dtype": "bfloat16"}]}))
  out = tmp / "bench.json"
  status = bench.main(SMALL_RUN + ["--objectives=sft,dpo,grpo,sample", "--dtype=bfloat16",
                                   "--num_devices=1", "--no-isolate", f"--json={out}",
                                   f"--compare={baseline}",
                                   f"--compiler_options={json.dumps(FAST_COMPILE)}"])
  return status, json.loads(out.read_text())


def test_bench_step_runs_every_objective_end_to_end_and_guards_regressions(tiny_run):
  status, data = tiny_run
  assert status == 1   # the regression against the baseline
  meta, rows = data["meta"], data["rows"]
  assert meta["compiler_options"] == FAST_COMPILE
  assert meta["device"] == "cpu" and meta["devices"] == 1 and meta["jax"] == jax.__version__
  assert meta["peak_bf16_flops_per_device"] is None
  assert [r["objective"] for r in rows] == ["sft", "dpo", "grpo", "sample"]
  assert [(c["key"]["objective"], c["regression"]) for c in meta["compare"]["checks"]] == [
      ("sft", True)]
  cfg = models.get_model_config("tiny")
  for row in rows[:3]:
    _check_train_row(row, cfg)
  # Random init (weights ~ N(0, 0.02)) predicts nearly uniformly: the SFT loss is ~ln(vocab);
  # the first DPO step has policy == reference, so its loss is ln 2 (up to bf16 rounding of
  # the two forward passes, which XLA may fuse differently).
  assert abs(rows[0]["final_loss"] - math.log(512)) < 0.05
  assert math.isclose(rows[1]["final_loss"], math.log(2), rel_tol=1e-3)
  sample = rows[3]
  assert set(bench.SAMPLE_FIELDS) <= set(sample)
  assert sample["batch"] == 2 and sample["prompt_len"] == 8 and sample["new_tokens"] == 3
  for phase in ("prefill", "generate"):
    assert sample[f"{phase}_s"] > 0 and sample[f"{phase}_compile_s"] > 0
    assert sample[f"{phase}_mem_planned_peak_bytes"] > 0
  assert sample["prefill_flops"] == bench.prefill_flops(cfg, 2, 8)
  assert sample["decode_flops"] == bench.decode_flops(cfg, 2, 8, 3)
  assert math.isclose(sample["prefill_tokens_per_s"], 2 * 8 / sample["prefill_s"])
  assert math.isclose(sample["decode_s"], sample["generate_s"] - sample["prefill_s"])
  if sample["decode_s"] > 0:   # two one-token steps: on a loaded CPU they can vanish in noise
    assert math.isclose(sample["decode_tokens_per_s"], 2 * 2 / sample["decode_s"])
  else:
    assert sample["decode_tokens_per_s"] is None and "decode rate n/a" in sample["note"]


def test_compiled_step_does_not_grow_with_depth(tiny_run):
  """Layers run under nn.scan: the whole SFT train step (forward, backward, AdamW) lowers to the
  same operations for 2 and 8 layers, and XLA's optimised HLO has as many instructions as the
  2-layer step of the benchmark run (its `hlo_ops`); only stacked shapes and the trip count
  differ. Unrolled layers would repeat the layer body per layer."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.default_rules()
  lowered = {}
  for layers in (2, 8):
    cfg = models.get_model_config("tiny", num_layers=layers, dtype="bfloat16")
    with sharding.axis_rules(rules, mesh):
      setup = bench.train_setup("sft", cfg, 2, 16, "auto", mesh, rules)
      lowered[layers] = setup.jitted.lower(*setup.abstract_args)
  assert _opcodes(lowered[2].as_text()) == _opcodes(lowered[8].as_text())
  deep = bench.hlo_op_count(lowered[8].compile(compiler_options=FAST_COMPILE))
  shallow = tiny_run[1]["rows"][0]
  assert (shallow["objective"], shallow["batch"], shallow["seq"]) == ("sft", 2, 16)
  assert deep == shallow["hlo_ops"] > 1000   # > 1000: the whole step, not an empty program


def _opcodes(mlir_text):
  """Sorted operation names of a lowered module ('%3 = stablehlo.add %1, %2 : ...' -> 'add')."""
  ops = re.findall(r"= \"?([a-z_]+\.[a-z_.]+)", mlir_text)
  assert ops
  return sorted(ops)


def test_bench_torch_runs_sft_dpo_and_generate_on_tiny(tmp_path):
  torch_bench = helpers.load_script("bench_torch")
  out = tmp_path / "torch.json"
  status = torch_bench.main(SMALL_RUN + ["--objectives=sft,dpo,sample", "--device=cpu",
                                         "--dtype=float32", "--param_dtype=float32",
                                         f"--json={out}"])
  assert status == 0
  data = json.loads(out.read_text())
  assert data["meta"]["framework"] == "torch" and data["meta"]["device"] == "cpu"
  sft, dpo, sample = data["rows"]
  cfg = models.get_model_config("tiny")
  for row in (sft, dpo):
    assert set(bench.TRAIN_FIELDS) <= set(row)
    assert row["framework"] == "torch" and row["note"] == ""
    assert row["flops_per_step"] == bench.step_flops(cfg, row["objective"], 2, 16)
    assert row["step_s"] > 0 and math.isclose(row["tokens_per_s"],
                                              row["tokens_per_step"] / row["step_s"])
    assert row["param_dtypes"] == ["float32"] and row["opt_state_dtypes"] == ["float32"]
  # HF's init is N(0, 0.02) too: near-uniform predictions; policy == reference at the first step.
  assert abs(sft["final_loss"] - math.log(512)) < 0.05
  assert math.isclose(dpo["final_loss"], math.log(2), rel_tol=1e-6)
  assert set(bench.SAMPLE_FIELDS) <= set(sample)
  assert sample["prefill_s"] > 0 and sample["generate_s"] > 0
  assert sample["decode_flops"] == bench.decode_flops(cfg, 2, 8, 3)
  # Both frameworks train on the same tokens.
  jax_batch = bench.make_batch("dpo", cfg, 2, 16)
  torch_batch = torch_bench.make_batch("dpo", cfg, 2, 16, torch_bench.torch.device("cpu"))
  np.testing.assert_array_equal(torch_batch["tokens"].numpy(), jax_batch["tokens"][0])


@pytest.mark.slow   # three fresh processes (JAX start-up + compiles each): 0.5-4 min on 2 shared cores
def test_isolated_runs_merge_into_one_json_and_keep_f32_master_weights(tmp_path):
  """The default `--isolate` path: one process per (shape, objective), rows merged into one
  JSON; with bf16 compute the real steps keep float32 params and Adam moments."""
  out = tmp_path / "isolated.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, os.path.join(helpers.ROOT, "scripts", "bench_step.py"), *SMALL_RUN,
       "--objectives=sft,dpo,sample", "--dtype=bfloat16", "--num_devices=1", f"--json={out}",
       f"--compiler_options={json.dumps(FAST_COMPILE)}"],
      capture_output=True, text=True, env=env, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = json.loads(out.read_text())["rows"]
  assert [r["objective"] for r in rows] == ["sft", "dpo", "sample"]
  for row in rows[:2]:
    assert row["note"] == "" and row["step_s"] > 0
    assert (row["dtype"], row["param_dtypes"], row["opt_state_dtypes"]) == (
        "bfloat16", ["float32"], ["float32"])
  assert rows[2]["generate_s"] > 0


@pytest.mark.slow   # ~20 compiles of the DPO step at growing batch sizes: 1-4.5 min on 2 shared cores
def test_find_max_batch_fits_more_pairs_on_the_fused_path_than_on_the_naive_one():
  """With a 32k vocabulary the naive path's [N, V] float32 logits dominate the plan, so within
  the same budget the fused log-prob path fits a larger DPO batch."""
  cfg = models.get_model_config("tiny", vocab_size=32768)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.default_rules()
  limit = 2**30
  found = {impl: bench.find_max_batch(cfg, 128, impl, limit, mesh, rules,
                                      options=FAST_COMPILE, log=lambda *_: None)
           for impl in ("blockwise", "reference")}
  for f in found.values():
    planned = {int(b): v for b, v in f["planned_bytes"].items()}
    assert planned[f["max_batch"]] <= limit < planned[f["first_too_large"]]
    sizes = sorted(planned)
    assert all(planned[a] < planned[b] for a, b in zip(sizes, sizes[1:]))
  assert found["blockwise"]["max_batch"] > found["reference"]["max_batch"] >= 1
