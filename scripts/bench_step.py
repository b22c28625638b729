"""Benchmark jpost's training steps (SFT, DPO, GRPO) and its sampler on named model shapes.

Random weights, synthetic full-length batches, jpost's own code end to end: the jitted
`make_train_step` of jpost/train/step.py with the registered losses (`nll`, `sigmoid`, `grpo`)
and AdamW from jpost/train/optim.py, placed on a (data, fsdp, tensor) mesh the way
jpost/train/loop.py places it; the sampler is `jpost.rl.sampler`'s jitted generate program.

  python scripts/bench_step.py                       # default shapes, sft,dpo,grpo,sample
  python scripts/bench_step.py --shapes=llama3_2_1b --objectives=sft,dpo --batch=8 --seq=2048
  python scripts/bench_step.py --shapes=tiny --steps=3 --json=cpu.json --compare=baseline.json
  python scripts/bench_step.py --shapes=llama3_2_1b,llama3_8b --find_max_batch

Per training row (batch = SFT sequences, DPO pairs, GRPO rollout rows; every row `--seq` tokens):
  step_s         median of `--steps` timed steps after `--warmup` steps, each followed by
                 `jax.block_until_ready` on the new state and metrics (compilation excluded).
  compile_s      trace + lower + XLA compile of the step (`lower_s` is the first part).
  tokens/s       tokens in the batch per step (DPO: chosen + rejected) / step_s; and per device.
  MFU            model FLOPs / step_s / (devices x dense bf16 peak of the device kind; n/a on
                 CPU and unknown kinds). Model FLOPs as in jpost/train/flops.py (the train
                 loop's MFU uses the same count): training = 3 x forward, forward =
                 2 * P_mm * T + 4 * L * d_attn * A(T), A(T) = T^2 / 2 causal pairs. A step is
                 training on its rows plus a reference forward on the same rows when the
                 objective has one (DPO; GRPO with its default kl_beta = 0.04).
  memory         from the compiled step's `memory_analysis()` (per device): arguments, outputs,
                 aliased (donated) bytes, temporaries, and planned peak = arguments + outputs -
                 aliased + temporaries; and `device_peak_bytes`, the allocator's peak
                 (`device.memory_stats()`, GPU / TPU only), which covers the whole process:
                 with `--isolate` (the default) every (shape, objective) runs in its own process.
Sampler rows (per `--sample_batches` size B, prompts of `--prompt_len` P, `--new_tokens` N, no
EOS so every row generates N tokens): `prefill_s` is the generate program with N = 1 (KV cache,
prompt forward, first token), `generate_s` the one with N tokens; decode = generate - prefill,
i.e. N - 1 one-token steps. Prefill FLOPs = forward over B x P tokens with the unembedding on
the last position only; a decode step at key count c costs 2 * P_mm + 4 * L * d_attn * c per row.

`--compare=baseline.json` matches rows by configuration, flags every row whose step time (or
prefill / generate time) grew by more than `--threshold`, or whose compile time or compiled
instruction count (`hlo_ops`: flat in depth under scan) grew by more than `--compile_threshold`,
and exits with status 1 if any did: the regression guard (tests never time anything).
`--compiler_options` passes XLA options to every compile (recorded in the JSON), e.g. GPU
scheduler flags to compare. `--find_max_batch` searches the
largest DPO batch whose compiled plan fits the device (`--memory_gib` overrides the limit), for
the fused log-prob path (`--impl`) and the naive one (`reference`: [N, V] float32 logits),
without allocating anything.
"""
import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpost import models  # noqa: E402
from jpost.data import batching  # noqa: E402
from jpost.data.encode import Seq  # noqa: E402
from jpost.losses import registry  # noqa: E402
from jpost.rl import advantages as adv_lib  # noqa: E402
from jpost.rl import loop as rl_loop  # noqa: E402
from jpost.rl import rollout  # noqa: E402
from jpost.rl import sampler  # noqa: E402
from jpost.train import batches as tbatches  # noqa: E402
from jpost.train import forward  # noqa: E402
from jpost.train import loop as train_loop  # noqa: E402
from jpost.train import metrics as tmetrics  # noqa: E402
from jpost.train import optim  # noqa: E402
from jpost.train import sharding  # noqa: E402
from jpost.train import step as tstep  # noqa: E402
from jpost.train.flops import decode_flops, forward_flops, matmul_params  # noqa: E402
from jpost.train.flops import peak_flops, prefill_flops, train_flops  # noqa: E402

OBJECTIVES = {"sft": "nll", "dpo": "sigmoid", "grpo": "grpo"}   # bench name -> registry name
KINDS = tuple(OBJECTIVES) + ("sample",)
DEFAULT_SHAPES = "qwen2_5_0_5b,llama3_2_1b,qwen3_1_7b,llama3_8b"
# Fields that identify a configuration (--compare matches rows on them).
KEY_FIELDS = ("shape", "objective", "batch", "seq", "dtype", "param_dtype", "remat", "attention",
              "impl", "devices", "prompt_len", "new_tokens", "decode_phases")
# What --compare guards, per row kind: run times (--threshold) and compile cost (the compile
# time and the compiled step's instruction count, which grows with depth if layers unroll:
# --compile_threshold).
GUARDED = {"train": ("step_s",), "sample": ("prefill_s", "generate_s")}
GUARDED_COMPILE = {"train": ("compile_s", "hlo_ops"), "sample": ("generate_compile_s",)}
MEMORY_FIELDS = ("mem_argument_bytes", "mem_output_bytes", "mem_alias_bytes", "mem_temp_bytes",
                 "mem_planned_peak_bytes")
# Every row carries these (None where not applicable); scripts/bench_torch.py writes the same.
COMMON_FIELDS = ("framework", "shape", "objective", "batch", "seq", "prompt_len", "new_tokens",
                 "dtype", "param_dtype", "remat", "attention", "impl", "devices", "params",
                 "matmul_params", "device_peak_bytes", "note")
TRAIN_FIELDS = COMMON_FIELDS + (
    "loss", "rows", "tokens_per_step", "flops_per_step", "lower_s", "compile_s", "hlo_ops",
    "step_s", "step_s_all", "tokens_per_s", "tokens_per_s_per_device", "mfu", "final_loss",
    "skipped_steps", "param_dtypes", "opt_state_dtypes") + MEMORY_FIELDS
SAMPLE_FIELDS = COMMON_FIELDS + tuple(
    f"{phase}_{field}" for phase in ("prefill", "generate")
    for field in ("compile_s", "s", "s_all") + MEMORY_FIELDS) + (
    "decode_s", "prefill_flops", "decode_flops", "prefill_tokens_per_s",
    "prefill_tokens_per_s_per_device", "prefill_mfu", "decode_tokens_per_s",
    "decode_tokens_per_s_per_device", "decode_mfu", "decode_phases")


# ---------------------------------------------------------------------------------------------
# Model FLOPs
# ---------------------------------------------------------------------------------------------

def param_count(cfg) -> int:
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(models.param_shapes(cfg)))


def step_flops(cfg, kind: str, batch: int, seq: int) -> float:
  """Model FLOPs of one step: training on its rows (+ the reference forward if it has one)."""
  objective = registry.get_objective(OBJECTIVES[kind])
  rows = step_rows(kind, batch)
  flops = train_flops(cfg, rows, seq)
  if objective.needs_ref:
    flops += forward_flops(cfg, rows, seq)
  return flops


def step_rows(kind: str, batch: int) -> int:
  return 2 * batch if kind == "dpo" else batch


# ---------------------------------------------------------------------------------------------
# Devices, timing, memory
# ---------------------------------------------------------------------------------------------

def device_peak_bytes(devices) -> int | None:
  peaks = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def memory_fields(compiled, prefix="mem") -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {f"{prefix}_{k}": None for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                            "temp_bytes", "planned_peak_bytes")}
  arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
  return {f"{prefix}_argument_bytes": arg, f"{prefix}_output_bytes": out,
          f"{prefix}_alias_bytes": alias, f"{prefix}_temp_bytes": temp,
          f"{prefix}_planned_peak_bytes": arg + out - alias + temp}


def hlo_op_count(compiled) -> int:
  """Instructions in the optimised HLO (with scan, independent of the number of layers)."""
  return sum(" = " in line for line in compiled.as_text().splitlines())


def leaf_dtypes(tree) -> list[str]:
  """The floating-point dtypes among a pytree's leaves (counters and keys left out)."""
  return sorted({x.dtype.name for x in jax.tree.leaves(tree)
                 if jnp.issubdtype(x.dtype, jnp.floating)})


def lower_and_compile(jitted, *args, options=None):
  """-> (compiled, lower seconds, lower + compile seconds); `options`: XLA compiler options."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile(compiler_options=options or None)
  t2 = time.perf_counter()
  return compiled, t1 - t0, t2 - t0


def abstract(tree):
  """Arrays -> ShapeDtypeStructs with their shardings (what lowering needs, nothing allocated)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


# ---------------------------------------------------------------------------------------------
# Synthetic batches (through jpost's own batch builders)
# ---------------------------------------------------------------------------------------------

def _seq(rng, vocab, n, prompt_len):
  mask = np.zeros(n, np.int8)
  mask[prompt_len:] = 1
  return Seq(rng.integers(1, vocab, n).astype(np.int32), mask, prompt_len)


def make_batch(kind: str, cfg, batch: int, seq: int, seed: int = 0) -> dict:
  """A host batch of one micro-batch ([1, rows, seq] leaves): every row `seq` real tokens.

  sft: prompt = first half, loss on the second; dpo: `batch` pairs sharing a prompt half with
  different completions; grpo: `batch` rollout rows of `--seq` tokens (a quarter prompt) built
  by jpost.rl.rollout, with random per-row advantages broadcast to the response tokens.
  """
  rng = np.random.default_rng(seed)
  v, half = cfg.vocab_size, seq // 2
  if kind == "sft":
    examples = [[_seq(rng, v, seq, half)] for _ in range(batch)]
    host = batching.unpacked_batch(examples, seq)
  elif kind == "dpo":
    examples = []
    for _ in range(batch):
      prompt = rng.integers(1, v, half).astype(np.int32)
      pair = []
      for _ in range(2):
        ids = np.concatenate([prompt, rng.integers(1, v, seq - half).astype(np.int32)])
        mask = np.concatenate([np.zeros(half, np.int8), np.ones(seq - half, np.int8)])
        pair.append(Seq(ids, mask, half))
      examples.append(pair)
    host = batching.unpacked_batch(examples, seq, per=2)
  elif kind == "grpo":
    p = max(seq // 4, 1)
    responses = [rollout.Response(prompt_ids=rng.integers(1, v, p).astype(np.int32),
                                  ids=rng.integers(1, v, seq - p).astype(np.int32),
                                  sampler_logp=-rng.exponential(2.0, seq - p).astype(np.float32))
                 for _ in range(batch)]
    host = rollout.build_batch(responses, seq)
    # Group-normalised advantages are ~N(0, 1) per row; drawn directly, so that any --batch
    # (even one row, a group of one whose advantage would be 0) trains on a non-zero signal.
    seq_adv = rng.standard_normal(batch).astype(np.float32)
    host["advantages"] = adv_lib.broadcast_to_tokens(seq_adv, host["seq_index"],
                                                     host["loss_mask"])
  else:
    raise ValueError(f"no training batch for {kind!r}")
  stacked = tbatches.stack([host])
  if kind == "grpo":
    stacked.update(rl_loop.subset_denominators(stacked))   # what rl.loop.update adds
  return stacked


# ---------------------------------------------------------------------------------------------
# One training row
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StatePlan:
  """What every objective on one model and mesh shares: shardings, the optimiser, and jitted
  initialisers (compiled once per model, not once per objective)."""
  param_shardings: object   # {'lm': ...}
  state_shardings: object
  abstract_state: object    # TrainState of ShapeDtypeStructs with their shardings
  optimizer: object
  schedule: object
  init_params: object       # key -> {'lm': params}, placed
  init_state: object        # params -> TrainState, placed


@functools.lru_cache(maxsize=8)
def state_plan(cfg, mesh, rules) -> StatePlan:
  """The loop's shardings, AdamW (jpost's default optimiser config) and state for `cfg`."""
  axes = {"lm": models.param_logical_axes(cfg)}
  shapes = {"lm": models.param_shapes(cfg)}
  param_shardings = sharding.logical_to_sharding(axes, mesh, rules, shapes=shapes)
  opt_cfg = optim.default_config()
  optimizer = optim.make_optimizer(opt_cfg, 1000, mask=optim.decay_mask(axes))
  schedule = optim.make_schedule(opt_cfg, 1000)
  new_state = lambda p: tstep.init_state(p, optimizer, 0)  # noqa: E731
  abstract_state = jax.eval_shape(new_state, shapes)
  state_shardings = train_loop.state_shardings_of(abstract_state, param_shardings, optimizer, mesh)
  abstract_state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state,
      state_shardings)
  init_params = jax.jit(lambda key: {"lm": models.init_params(cfg, key)},
                        out_shardings=param_shardings)
  return StatePlan(param_shardings, state_shardings, abstract_state, optimizer, schedule,
                   init_params, jax.jit(new_state, out_shardings=state_shardings))


@dataclasses.dataclass
class TrainSetup:
  jitted: object            # the jitted train step (state donated)
  abstract_args: tuple      # (state, ref params, batch) as ShapeDtypeStructs
  plan: StatePlan
  batch: dict               # on device


def train_setup(kind, cfg, batch, seq, impl, mesh, rules) -> TrainSetup:
  """The loop's state, shardings and jitted step for one objective, nothing allocated but the
  batch."""
  objective = registry.get_objective(OBJECTIVES[kind])
  plan = state_plan(cfg, mesh, rules)
  abstract_ref = None
  if objective.needs_ref:
    abstract_ref = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                {"lm": models.param_shapes(cfg)}, plan.param_shardings)
  spec = forward.ForwardSpec(model_cfg=cfg, needs_ref=objective.needs_ref,
                             needs_entropy=objective.needs_entropy, needs_kl=objective.needs_kl,
                             impl=impl)
  step_fn = tstep.make_train_step(spec, objective.fn, objective.default_config(),
                                  objective.denom_unit, plan.optimizer, plan.schedule,
                                  objective.update_objective_state)
  device_batch = tbatches.to_device(make_batch(kind, cfg, batch, seq), mesh)
  return TrainSetup(jax.jit(step_fn, donate_argnums=(0,)),
                    (plan.abstract_state, abstract_ref, abstract(device_batch)), plan,
                    device_batch)


def bench_train(kind, cfg, args, mesh, rules, devices) -> dict:
  row = dict(objective=kind, loss=OBJECTIVES[kind], batch=args.batch, seq=args.seq,
             rows=step_rows(kind, args.batch), impl=args.impl)
  row["tokens_per_step"] = row["rows"] * args.seq
  row["flops_per_step"] = step_flops(cfg, kind, args.batch, args.seq)
  with sharding.axis_rules(rules, mesh):
    setup = train_setup(kind, cfg, args.batch, args.seq, args.impl, mesh, rules)
    compiled, row["lower_s"], row["compile_s"] = lower_and_compile(
        setup.jitted, *setup.abstract_args, options=args.compiler_options)
    row["hlo_ops"] = hlo_op_count(compiled)
    row.update(memory_fields(compiled))
    limit = tmetrics.device_memory_limit(devices[0])
    if row["mem_planned_peak_bytes"] is not None and row["mem_planned_peak_bytes"] > limit:
      row["note"] = (f"does not fit: planned {row['mem_planned_peak_bytes'] / 2**30:.1f} GiB > "
                     f"{limit / 2**30:.1f} GiB per device")
      return row
    key = jax.random.PRNGKey(0)
    # The reference starts equal to the policy (as in the loop): the same draw, its own buffers
    # (the policy's are donated to the step).
    ref = setup.plan.init_params(key) if setup.abstract_args[1] is not None else None
    state = setup.plan.init_state(setup.plan.init_params(key))
    times = []
    for i in range(args.warmup + args.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, ref, setup.batch)
      jax.block_until_ready((state, metrics))
      if i >= args.warmup:
        times.append(time.perf_counter() - t0)
  metrics = jax.device_get(metrics)
  row["step_s"] = statistics.median(times)
  row["step_s_all"] = times
  row["final_loss"] = float(metrics["train/loss"])
  row["skipped_steps"] = int(metrics["train/skipped_steps"])
  row["param_dtypes"] = leaf_dtypes(state.params)
  row["opt_state_dtypes"] = leaf_dtypes(state.opt_state)
  row["device_peak_bytes"] = device_peak_bytes(devices)
  row.update(rates(row["tokens_per_step"], row["flops_per_step"], row["step_s"],
                   devices[0].device_kind, len(devices)))
  notes = []
  if not math.isfinite(row["final_loss"]) or row["skipped_steps"]:
    notes.append(f"non-finite loss or gradients ({row['skipped_steps']} steps skipped)")
  row["note"] = "; ".join(notes)
  return row


def rates(tokens, flops, seconds, device_kind: str, n: int, prefix=""):
  """Throughput fields of a row: tokens/s (all and per device) and MFU (None off the table)."""
  peak = peak_flops(device_kind)
  if seconds is None or seconds <= 0:
    return {f"{prefix}tokens_per_s": None, f"{prefix}tokens_per_s_per_device": None,
            f"{prefix}mfu": None}
  return {f"{prefix}tokens_per_s": tokens / seconds,
          f"{prefix}tokens_per_s_per_device": tokens / seconds / n,
          f"{prefix}mfu": flops / seconds / (peak * n) if peak else None}


def sampler_fields(cfg, b, p, n, timed, device_kind, n_devices) -> dict:
  """A sampler row's times, FLOPs and rates from the median `timed` prefill and generate seconds
  (b prompts of p tokens, n new tokens): decode = generate - prefill. Shared with bench_torch."""
  decode_s = timed["generate"] - timed["prefill"]
  row = dict(prefill_s=timed["prefill"], generate_s=timed["generate"], decode_s=decode_s,
             prefill_flops=prefill_flops(cfg, b, p), decode_flops=decode_flops(cfg, b, p, n))
  row.update(rates(b * p, row["prefill_flops"], timed["prefill"], device_kind, n_devices,
                   "prefill_"))
  row.update(rates(b * (n - 1), row["decode_flops"], decode_s if decode_s > 0 else None,
                   device_kind, n_devices, "decode_"))
  row["note"] = "" if decode_s > 0 else "generate not slower than prefill: decode rate n/a"
  return row


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------

def compiled_generate(cfg, sc, batch, prompt_len, mesh, rules, params, prompt, lengths, rng,
                      options=None):
  """The sampler's own jitted program (the one `make_generate_fn` calls, from its cache),
  lowered and compiled here so that compile time and memory come from the timed executable."""
  jitted = sampler.jitted_generate(cfg, sc, batch, prompt_len, mesh, rules)
  return lower_and_compile(jitted, params, prompt, lengths, rng, options=options)


def bench_sample(cfg, args, mesh, rules, devices) -> list[dict]:
  out = []
  p, n = args.prompt_len, args.new_tokens
  if n < 2:
    raise ValueError(f"--new_tokens={n}: the decode rate needs at least 2 new tokens")
  with sharding.axis_rules(rules, mesh):
    params = state_plan(cfg, mesh, rules).init_params(jax.random.PRNGKey(0))["lm"]
    # What the sampler's program is given (make_generate_fn casts the masters the same way).
    params = sampler.jitted_compute_weights(cfg)(params)
    for b in args.sample_batches:
      row = dict(objective="sample", batch=b, prompt_len=p, new_tokens=n, impl="n/a",
                 decode_phases=args.decode_phases)
      rng_np = np.random.default_rng(b)
      prompt = rng_np.integers(1, cfg.vocab_size, (b, p)).astype(np.int32)
      lengths = np.full((b,), p, np.int32)
      place = sharding.logical_to_sharding((("batch", "length"), ("batch",)), mesh, rules,
                                           shapes=(prompt, lengths))
      prompt, lengths = jax.device_put((prompt, lengths), place)
      key = jax.random.PRNGKey(0)
      timed = {}
      for name, new in (("prefill", 1), ("generate", n)):
        # No EOS and no stop sequences: every row generates exactly `new` tokens.
        sc = sampler.SamplingConfig(max_new_tokens=new, temperature=1.0, prompt_buckets=(p,),
                                    decode_phases=args.decode_phases)
        compiled, _, row[f"{name}_compile_s"] = compiled_generate(
            cfg, sc, b, p, mesh, rules, params, prompt, lengths, key, args.compiler_options)
        row.update(memory_fields(compiled, prefix=f"{name}_mem"))
        times = []
        for i in range(args.warmup + args.steps):
          t0 = time.perf_counter()
          result = compiled(params, prompt, lengths, key)
          jax.block_until_ready(result)
          if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        got = np.asarray(result["lengths"])
        if not (got == new).all():
          raise RuntimeError(f"sampler generated {got.min()}..{got.max()} tokens, expected {new}")
        timed[name] = statistics.median(times)
        row[f"{name}_s_all"] = times
      row.update(sampler_fields(cfg, b, p, n, timed, devices[0].device_kind, len(devices)))
      row["device_peak_bytes"] = device_peak_bytes(devices)
      out.append(row)
  return out


# ---------------------------------------------------------------------------------------------
# Largest DPO batch that fits (compiled plans only)
# ---------------------------------------------------------------------------------------------

def planned_bytes(cfg, batch, seq, impl, mesh, rules, options=None) -> int:
  with sharding.axis_rules(rules, mesh):
    setup = train_setup("dpo", cfg, batch, seq, impl, mesh, rules)
    compiled, _, _ = lower_and_compile(setup.jitted, *setup.abstract_args, options=options)
  planned = memory_fields(compiled)["mem_planned_peak_bytes"]
  if planned is None:
    raise RuntimeError("this backend gives no memory analysis: --find_max_batch cannot run")
  return planned


def find_max_batch(cfg, seq, impl, limit, mesh, rules, upper=4096, options=None,
                   log=print) -> dict:
  """Largest DPO batch (pairs) with planned peak <= limit: doubling, then bisection to 1/8."""
  fits = {}

  def probe(b):
    fits[b] = planned_bytes(cfg, b, seq, impl, mesh, rules, options)
    log(f"  {cfg.name} dpo impl={impl} batch {b}: planned {fits[b] / 2**30:.2f} GiB "
        f"({'fits' if fits[b] <= limit else 'too large'})")
    return fits[b] <= limit

  lo, hi = 0, None
  b = 1
  while b <= upper:
    if not probe(b):
      hi = b
      break
    lo, b = b, 2 * b
  while hi is not None and hi - lo > max(1, lo // 8):
    mid = (lo + hi) // 2
    if probe(mid):
      lo = mid
    else:
      hi = mid
  return dict(shape=cfg.name, objective="dpo", impl=impl, seq=seq, limit_bytes=limit,
              max_batch=lo, first_too_large=hi, planned_bytes={str(k): v for k, v in
                                                               sorted(fits.items())},
              note="" if hi is not None else f"every batch up to {upper} fits")


# ---------------------------------------------------------------------------------------------
# Comparing with a baseline
# ---------------------------------------------------------------------------------------------

def row_key(row) -> tuple:
  return tuple(row.get(k) for k in KEY_FIELDS)


def compare(meta, rows, baseline, threshold, compile_threshold=0.5) -> list[dict]:
  """One check per guarded field of every row the baseline has: a regression when it grew by
  more than `threshold` (run times) or `compile_threshold` (compile cost), as fractions."""
  if baseline["meta"].get("device") != meta.get("device"):
    raise ValueError(f"baseline ran on {baseline['meta'].get('device')!r}, this run on "
                     f"{meta.get('device')!r}: step times are not comparable")
  base = {row_key(r): r for r in baseline["rows"]}
  out = []
  for row in rows:
    old = base.get(row_key(row))
    if old is None:
      continue
    kind = "sample" if row["objective"] == "sample" else "train"
    limits = [(f, threshold) for f in GUARDED[kind]]
    limits += [(f, compile_threshold) for f in GUARDED_COMPILE[kind]]
    for field, limit in limits:
      new_t, old_t = row.get(field), old.get(field)
      if new_t is None or old_t is None or old_t <= 0:
        continue
      ratio = new_t / old_t
      out.append(dict(key=dict(zip(KEY_FIELDS, row_key(row))), field=field, baseline=old_t,
                      current=new_t, ratio=ratio, regression=ratio > 1 + limit))
  return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def model_config(shape, args):
  overrides = {k: getattr(args, k) for k in ("dtype", "param_dtype") if getattr(args, k)}
  return models.get_model_config(shape, remat=args.remat, attention_impl=args.attention,
                                 **overrides)


def run_one(shape, kind, args, mesh, rules, devices) -> list[dict]:
  cfg = model_config(shape, args)
  common = dict(framework="jax", shape=shape, dtype=cfg.dtype, param_dtype=cfg.param_dtype, remat=cfg.remat,
                attention=cfg.attention_impl, devices=len(devices),
                params=param_count(cfg),
                matmul_params=matmul_params(cfg))
  if kind == "sample":
    rows = bench_sample(cfg, args, mesh, rules, devices)
  else:
    rows = [bench_train(kind, cfg, args, mesh, rules, devices)]
  fields = SAMPLE_FIELDS if kind == "sample" else TRAIN_FIELDS
  return [complete({**common, "seq": None if kind == "sample" else args.seq, "prompt_len": None,
                    "new_tokens": None, **row}, fields) for row in rows]


def complete(row, fields) -> dict:
  """Every schema field present (None where this run has no value for it)."""
  return {**{f: None for f in fields}, **row}


def run_meta(devices) -> dict:
  kind = devices[0].device_kind
  return {"device": kind, "backend": jax.default_backend(), "devices": len(devices),
          "jax": jax.__version__, "peak_bf16_flops_per_device": peak_flops(kind),
          "memory_limit_bytes": tmetrics.device_memory_limit(devices[0]),
          "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}


def _child_argv(argv, shape, kind, json_path):
  """This run's flags for one (shape, objective) child, minus those the parent handles."""
  with_value = ("--shapes", "--objectives", "--json", "--compare")
  switches = ("--isolate", "--no-isolate", "--find_max_batch")
  kept, skip = [], False
  for a in argv:
    name = a.split("=", 1)[0]
    if skip:
      skip = False
    elif name in with_value:
      skip = "=" not in a      # '--json out.json': drop the value too
    elif name not in switches:
      kept.append(a)
  return [sys.executable, os.path.abspath(__file__), *kept, f"--shapes={shape}",
          f"--objectives={kind}", f"--json={json_path}", "--no-isolate"]


def run_isolated(argv, shapes, kinds) -> tuple[dict, list]:
  """Each (shape, objective) in its own process: per-run device peaks, and a crash or OOM in
  one run is reported as its row instead of ending the benchmark."""
  meta, rows = None, []
  with tempfile.TemporaryDirectory() as tmp:
    for shape in shapes:
      for kind in kinds:
        path = os.path.join(tmp, f"{shape}_{kind}.json")
        proc = subprocess.run(_child_argv(argv, shape, kind, path), capture_output=True,
                              text=True)
        if proc.returncode == 0:
          print(f"# {shape} {kind}: done", flush=True)
          with open(path) as f:
            got = json.load(f)
          meta = meta or got["meta"]
          rows.extend(got["rows"])
        else:
          sys.stdout.write(proc.stdout)
          sys.stderr.write(proc.stderr[-4000:])
          tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
          print(f"# {shape} {kind}: failed with exit code {proc.returncode}: {tail}",
                file=sys.stderr)
          rows.append(dict(shape=shape, objective=kind,
                           note=f"failed (exit {proc.returncode}): {tail[:300]}"))
  return meta, rows


def print_table(rows):
  gib = lambda b: "n/a" if b is None else f"{b / 2**30:.2f}"  # noqa: E731
  pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
  num = lambda x, f="{:,.0f}": "n/a" if x is None else f.format(x)  # noqa: E731
  train = [r for r in rows if r.get("objective") != "sample"]
  sample = [r for r in rows if r.get("objective") == "sample"]
  if train:
    print("| shape | objective | batch x seq | dtype / params | remat | attention | step ms | "
          "tokens/s | tokens/s/dev | MFU | compile s | planned GiB | device peak GiB | note |")
    print("|" + "---|" * 14)
    for r in train:
      print(f"| {r['shape']} | {r['objective']} | {r.get('batch')} x {r.get('seq')} | "
            f"{r.get('dtype')} / {r.get('param_dtype')} | {r.get('remat')} | "
            f"{r.get('attention')} | {num(r.get('step_s') and 1e3 * r['step_s'], '{:.1f}')} | "
            f"{num(r.get('tokens_per_s'))} | {num(r.get('tokens_per_s_per_device'))} | "
            f"{pct(r.get('mfu'))} | {num(r.get('compile_s'), '{:.1f}')} | "
            f"{gib(r.get('mem_planned_peak_bytes'))} | {gib(r.get('device_peak_bytes'))} | "
            f"{r.get('note', '')} |")
  if sample:
    print("\n| shape | batch | prompt + new | prefill ms | prefill tok/s | prefill MFU | "
          "decode ms | decode tok/s | decode tok/s/dev | decode MFU | compile s | "
          "planned GiB | note |")
    print("|" + "---|" * 13)
    for r in sample:
      print(f"| {r['shape']} | {r.get('batch')} | {r.get('prompt_len')} + {r.get('new_tokens')} | "
            f"{num(r.get('prefill_s') and 1e3 * r['prefill_s'], '{:.1f}')} | "
            f"{num(r.get('prefill_tokens_per_s'))} | {pct(r.get('prefill_mfu'))} | "
            f"{num(r.get('decode_s') and 1e3 * r['decode_s'], '{:.1f}')} | "
            f"{num(r.get('decode_tokens_per_s'))} | {num(r.get('decode_tokens_per_s_per_device'))} | "
            f"{pct(r.get('decode_mfu'))} | {num(r.get('generate_compile_s'), '{:.1f}')} | "
            f"{gib(r.get('generate_mem_planned_peak_bytes'))} | {r.get('note', '')} |")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=DEFAULT_SHAPES, help="named ModelConfigs, comma-separated")
  p.add_argument("--objectives", default=",".join(KINDS), help=f"subset of {','.join(KINDS)}")
  p.add_argument("--batch", type=int, default=8, help="SFT sequences / DPO pairs / GRPO rows")
  p.add_argument("--seq", type=int, default=2048, help="tokens per training row")
  p.add_argument("--steps", type=int, default=10, help="timed steps (sampler: timed calls)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="", help="compute dtype (default: the shape's own)")
  p.add_argument("--param_dtype", default="", help="master weights / optimiser state dtype")
  p.add_argument("--remat", default="none", help="none | full | dots | dots_no_batch")
  p.add_argument("--attention", default="auto", help="auto | xla | cudnn | splash")
  p.add_argument("--impl", default="auto", help="token_logprobs implementation")
  p.add_argument("--sample_batches", default="1,8,32", help="sampler batch sizes")
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--decode_phases", type=int, default=sampler.SamplingConfig.decode_phases,
                 help="sampler: decode loops over a growing cache (1 = one loop over the whole "
                      "preallocated cache)")
  p.add_argument("--num_devices", type=int, default=0, help="use the first N devices (0: all)")
  p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1: the rest)")
  p.add_argument("--isolate", dest="isolate", action="store_true", default=True,
                 help="one process per (shape, objective) (default)")
  p.add_argument("--no-isolate", dest="isolate", action="store_false")
  p.add_argument("--json", default="bench_step.json")
  p.add_argument("--compare", default="", help="baseline JSON: flag step-time regressions")
  p.add_argument("--threshold", type=float, default=0.10,
                 help="--compare: allowed slowdown as a fraction (0.10 = 10%%)")
  p.add_argument("--compile_threshold", type=float, default=0.5,
                 help="--compare: allowed growth of compile time and compiled instructions")
  p.add_argument("--find_max_batch", action="store_true",
                 help="largest DPO batch that fits, fused (--impl) vs naive (reference) path")
  p.add_argument("--memory_gib", type=float, default=0.0,
                 help="--find_max_batch: memory limit per device (default: the device's)")
  p.add_argument("--compiler_options", default="{}",
                 help='XLA options for every compile, JSON, e.g. '
                      '{"xla_gpu_enable_latency_hiding_scheduler": true}')
  args = p.parse_args(argv)
  try:
    args.compiler_options = json.loads(args.compiler_options)
  except json.JSONDecodeError as e:
    p.error(f"--compiler_options is not JSON: {e}")
  if not isinstance(args.compiler_options, dict):
    p.error("--compiler_options must be a JSON object")
  args.sample_batches = [int(b) for b in args.sample_batches.split(",") if b]
  kinds = [k for k in args.objectives.split(",") if k]
  unknown = sorted(set(kinds) - set(KINDS))
  if unknown:
    p.error(f"--objectives: unknown {unknown} (known: {','.join(KINDS)})")
  args.kinds = kinds
  args.shape_list = [s for s in args.shapes.split(",") if s]
  for shape in args.shape_list:
    try:
      model_config(shape, args)   # unknown shape / dtype / remat / attention: fail before running
    except ValueError as e:
      p.error(str(e))
  if args.batch < 1 or args.seq < 2 or args.steps < 1 or args.warmup < 0:
    p.error("--batch >= 1, --seq >= 2, --steps >= 1 and --warmup >= 0")
  return args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.isolate and len(args.shape_list) * len(args.kinds) > 1 and not args.find_max_batch:
    meta, rows = run_isolated(argv, args.shape_list, args.kinds)
    if meta is None:
      print("every run failed", file=sys.stderr)
      return 1
  else:
    devices = jax.devices()[:args.num_devices or None]
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(data=data, fsdp=fsdp, tensor=tensor, devices=devices)
    rules = sharding.default_rules()
    meta, rows = run_meta(devices), []
    meta["compiler_options"] = args.compiler_options
    print(f"# jpost step benchmark on {len(devices)} x {meta['device']} ({meta['backend']}), "
          f"jax {jax.__version__}", flush=True)
    if args.find_max_batch:
      limit = int(args.memory_gib * 2**30) if args.memory_gib else tmetrics.device_memory_limit(devices[0])
      meta["max_batch"] = []
      for shape in args.shape_list:
        cfg = model_config(shape, args)
        for impl in (args.impl, "reference"):
          found = find_max_batch(cfg, args.seq, impl, limit, mesh, rules,
                                 options=args.compiler_options)
          meta["max_batch"].append(found)
          print(f"# {shape} dpo seq {args.seq} impl={impl}: largest batch {found['max_batch']} "
                f"pairs (first too large: {found['first_too_large']}) within "
                f"{limit / 2**30:.2f} GiB", flush=True)
    else:
      for shape in args.shape_list:
        for kind in args.kinds:
          rows.extend(run_one(shape, kind, args, mesh, rules, devices))
  meta["command"] = "python scripts/bench_step.py " + " ".join(argv)
  print_table(rows)
  status = 0
  if args.compare:
    with open(args.compare) as f:
      baseline = json.load(f)
    checks = compare(meta, rows, baseline, args.threshold, args.compile_threshold)
    meta["compare"] = dict(baseline=args.compare, threshold=args.threshold,
                           compile_threshold=args.compile_threshold, checks=checks)
    bad = [c for c in checks if c["regression"]]
    print(f"\n# compare with {args.compare} (threshold +{100 * args.threshold:.0f}%): "
          f"{len(checks)} values matched, {len(bad)} regressions")
    for c in checks:
      k = c["key"]
      print(f"{'REGRESSION' if c['regression'] else 'ok'}: {k['shape']} {k['objective']} "
            f"batch {k['batch']} {c['field']} {c['baseline']:.4g} -> {c['current']:.4g} "
            f"(x{c['ratio']:.2f})")
    status = 1 if bad else 0
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.json}")
  return status


if __name__ == "__main__":
  sys.exit(main())
