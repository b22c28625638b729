"""The PyTorch + transformers baseline for scripts/bench_step.py: the same SFT and DPO steps and
HF `generate`, on the same model shapes and batches, written to the same JSON schema.

  python scripts/bench_torch.py --shapes=llama3_2_1b --objectives=sft,dpo,sample --batch=8 \
      --seq=2048 --json=torch.json
  python scripts/bench_step.py --shapes=llama3_2_1b --objectives=sft,dpo,sample --batch=8 \
      --seq=2048 --json=jax.json              # back to back on the same GPU

The model is `AutoModelForCausalLM.from_config` of the HF config jpost writes for the shape
(`jpost.models.config_to_hf`), randomly initialised. Precision mirrors jpost's policies:
`--param_dtype=float32 --dtype=bfloat16` (the default) keeps float32 weights and AdamW state and
runs the forward under `torch.autocast(bfloat16)`; `--param_dtype=bfloat16` stores bf16 weights;
float32 / float32 is plain float32. A step is what TRL does: forward -> per-token log-probs from
`log_softmax` of the float32 logits ([N, V] materialised: the naive path) -> loss (SFT: token-mean
NLL on the completion; DPO: sigmoid loss, beta 0.1, policy on chosen + rejected in one batch,
reference forward under no_grad) -> backward -> global-norm clip 1.0 -> AdamW. Batches: every
row `--seq` random tokens, prompt = first half (as bench_step's). Sampling: `generate` with
`do_sample=True`, temperature 1, `min_new_tokens = max_new_tokens` (no early stop); prefill =
the call with one new token, decode = the rest, as in bench_step.

Times: median of `--steps` steps after `--warmup`, `torch.cuda.synchronize()` around each on
GPU. Memory: `torch.cuda.max_memory_allocated()` per row (reset before it); the compiled-plan
fields of bench_step are None here. FLOPs, MFU and the field names come from bench_step.
"""
import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time

# bench_step (imported for the FLOP count and the schema) imports jax: keep it off the GPU, or
# its allocator would reserve most of the device memory before torch runs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402

import bench_step  # noqa: E402
from jpost import models  # noqa: E402

TORCH_KINDS = ("sft", "dpo", "sample")
DPO_BETA = 0.1
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_model(cfg, param_dtype, attn, device):
  hf = models.config_to_hf(cfg)
  config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      config, dtype=TORCH_DTYPES[param_dtype], attn_implementation=attn)
  return model.to(device)


def autocast(device, dtype, param_dtype):
  if dtype == param_dtype:
    return contextlib.nullcontext()
  return torch.autocast(device_type=device.type, dtype=TORCH_DTYPES[dtype])


def token_logps(model, tokens, targets):
  """Per-token log p(target) [B, T] from float32 log_softmax of the full logits (as TRL)."""
  logits = model(input_ids=tokens).logits.float()
  return torch.gather(F.log_softmax(logits, dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def make_batch(kind, cfg, batch, seq, device):
  """bench_step's host batch (same tokens, targets and loss mask), as torch tensors [rows, T]."""
  host = bench_step.make_batch(kind, cfg, batch, seq)
  return {k: torch.as_tensor(np.asarray(host[k][0])).to(device)
          for k in ("tokens", "targets", "loss_mask")}


def sft_loss(model, ref, b):
  del ref
  logp = token_logps(model, b["tokens"], b["targets"])
  return -(logp * b["loss_mask"]).sum() / b["loss_mask"].sum().clamp(min=1)


def dpo_loss(model, ref, b):
  """Rows 2i / 2i + 1 are the chosen / rejected of pair i (bench_step's layout)."""
  logp = (token_logps(model, b["tokens"], b["targets"]) * b["loss_mask"]).sum(-1)
  with torch.no_grad():
    ref_logp = (token_logps(ref, b["tokens"], b["targets"]) * b["loss_mask"]).sum(-1)
  margin = (logp[0::2] - ref_logp[0::2]) - (logp[1::2] - ref_logp[1::2])
  return -F.logsigmoid(DPO_BETA * margin).mean()


LOSSES = {"sft": sft_loss, "dpo": dpo_loss}


def synchronize(device):
  if device.type == "cuda":
    torch.cuda.synchronize()


def reset_peak(device):
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()


def peak_bytes(device):
  return int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None


def device_kind(device):
  return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def timed_runs(fn, warmup, steps, device):
  """-> (seconds of each of the warmup + steps calls, the last call's result)."""
  times = []
  for _ in range(warmup + steps):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    times.append(time.perf_counter() - t0)
  return times, out


def bench_train(kind, cfg, args, device) -> dict:
  model = hf_model(cfg, args.param_dtype, args.attention, device)
  model.train()
  if args.remat == "full":
    model.gradient_checkpointing_enable()
  ref = None
  if kind == "dpo":
    ref = hf_model(cfg, args.param_dtype, args.attention, device).eval()
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
  if args.torch_compile:
    model = torch.compile(model)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0,
                                fused=device.type == "cuda")
  batch = make_batch(kind, cfg, args.batch, args.seq, device)
  loss_fn = LOSSES[kind]

  def step():
    with autocast(device, args.dtype, args.param_dtype):
      loss = loss_fn(model, ref, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()

  reset_peak(device)
  # The first call also pays for lazy initialisation (and torch.compile, if asked).
  all_times, loss = timed_runs(step, args.warmup, args.steps, device)
  times = all_times[args.warmup:]
  row = dict(objective=kind, loss={"sft": "nll", "dpo": "sigmoid"}[kind], batch=args.batch,
             seq=args.seq, rows=bench_step.step_rows(kind, args.batch), impl="log_softmax",
             step_s=statistics.median(times), step_s_all=times, final_loss=float(loss),
             skipped_steps=0, first_step_s=all_times[0],
             compile_s=all_times[0] if args.torch_compile else None,
             param_dtypes=sorted({str(p.dtype).replace("torch.", "") for p in
                                  model.parameters()}),
             opt_state_dtypes=sorted({str(v.dtype).replace("torch.", "")
                                      for s in optimizer.state.values() for v in s.values()
                                      if torch.is_tensor(v) and v.is_floating_point()}))
  row["tokens_per_step"] = row["rows"] * args.seq
  row["flops_per_step"] = bench_step.step_flops(cfg, kind, args.batch, args.seq)
  row["device_peak_bytes"] = peak_bytes(device)
  row.update(bench_step.rates(row["tokens_per_step"], row["flops_per_step"], row["step_s"],
                              device_kind(device), 1))
  row["note"] = "" if np.isfinite(row["final_loss"]) else "non-finite loss"
  return row


def bench_sample(cfg, args, device) -> list[dict]:
  # Inference holds the weights in the compute dtype, as HF generation usually does.
  model = hf_model(cfg, args.dtype, args.attention, device).eval()
  p, n = args.prompt_len, args.new_tokens
  out = []
  for b in args.sample_batches:
    rng = np.random.default_rng(b)
    prompt = torch.as_tensor(rng.integers(1, cfg.vocab_size, (b, p))).to(device)
    row = dict(objective="sample", batch=b, prompt_len=p, new_tokens=n, impl="generate")
    reset_peak(device)
    timed = {}
    for name, new in (("prefill", 1), ("generate", n)):
      def call(new=new):
        with torch.no_grad():
          return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                max_new_tokens=new, min_new_tokens=new, do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
                                eos_token_id=None)
      times, result = timed_runs(call, args.warmup, args.steps, device)
      times = times[args.warmup:]
      if result.shape != (b, p + new):
        raise RuntimeError(f"generate returned {tuple(result.shape)}, expected {(b, p + new)}")
      timed[name] = statistics.median(times)
      row[f"{name}_s_all"] = times
    row.update(bench_step.sampler_fields(cfg, b, p, n, timed, device_kind(device), 1))
    row["device_peak_bytes"] = peak_bytes(device)
    out.append(row)
  return out


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default=bench_step.DEFAULT_SHAPES)
  p.add_argument("--objectives", default=",".join(TORCH_KINDS), help="subset of sft,dpo,sample")
  p.add_argument("--batch", type=int, default=8, help="SFT sequences / DPO pairs")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES),
                 help="compute dtype (autocast when it differs from --param_dtype)")
  p.add_argument("--param_dtype", default="float32", choices=sorted(TORCH_DTYPES))
  p.add_argument("--remat", default="none", choices=["none", "full"],
                 help="full: transformers' gradient checkpointing")
  p.add_argument("--attention", default="sdpa", help="attn_implementation: sdpa | eager | "
                                                      "flash_attention_2")
  p.add_argument("--torch_compile", action="store_true", help="torch.compile the model")
  p.add_argument("--sample_batches", default="1,8,32")
  p.add_argument("--prompt_len", type=int, default=512)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
  p.add_argument("--json", default="bench_torch.json")
  args = p.parse_args(argv)
  args.sample_batches = [int(b) for b in args.sample_batches.split(",") if b]
  args.kinds = [k for k in args.objectives.split(",") if k]
  unknown = sorted(set(args.kinds) - set(TORCH_KINDS))
  if unknown:
    p.error(f"--objectives: unknown {unknown} (known: {','.join(TORCH_KINDS)})")
  if args.new_tokens < 2:
    p.error("--new_tokens must be >= 2 (the decode rate needs a decode step)")
  args.shape_list = [s for s in args.shapes.split(",") if s]
  for shape in args.shape_list:
    try:
      models.get_model_config(shape)
    except ValueError as e:
      p.error(str(e))
  return args


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  device = torch.device(args.device)
  kind = device_kind(device)
  meta = {"framework": "torch", "device": kind, "backend": device.type, "devices": 1,
          "torch": torch.__version__, "transformers": transformers.__version__,
          "peak_bf16_flops_per_device": bench_step.peak_flops(kind),
          "date": datetime.date.today().isoformat(),
          "command": "python scripts/bench_torch.py " + " ".join(argv)}
  print(f"# torch {torch.__version__} + transformers {transformers.__version__} step benchmark "
        f"on {kind}", flush=True)
  rows = []
  for shape in args.shape_list:
    cfg = models.get_model_config(shape)
    common = dict(framework="torch", shape=shape, dtype=args.dtype, param_dtype=args.param_dtype,
                  remat=args.remat, attention=args.attention, devices=1,
                  params=bench_step.param_count(cfg),
                  matmul_params=bench_step.matmul_params(cfg))
    for k in args.kinds:
      if k == "sample":
        got = bench_sample(cfg, args, device)
        fields = bench_step.SAMPLE_FIELDS
      else:
        got = [bench_train(k, cfg, args, device)]
        fields = bench_step.TRAIN_FIELDS
      for row in got:
        rows.append(bench_step.complete(
            {**common, "seq": None if k == "sample" else args.seq, "prompt_len": None,
             "new_tokens": None, **row}, fields))
      if device.type == "cuda":
        torch.cuda.empty_cache()
  bench_step.print_table(rows)
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
