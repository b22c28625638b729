"""Benchmark token_logprobs implementations: time, peak temporary memory, fraction of peak FLOP/s.

For each implementation and shape (N tokens, D hidden, V vocabulary):
  fwd / fwd+bwd  median wall time of a jitted call after warm-up (block_until_ready each call);
                 fwd+bwd is value_and_grad of sum(logp) [+ sum(entropy)] w.r.t. (h, w).
  temp           temp_size_in_bytes from the compiled executable's memory_analysis(): the
                 scratch XLA allocates beyond arguments and outputs (logits, tiles, accumulators).
  % peak         2NDV FLOPs (forward) and 8NDV (forward + backward: forward, one recompute, dh,
                 dw) over the device's dense bf16 peak; kernels that recompute logits twice in
                 the backward do 10NDV, so their true utilisation is 1.25x the figure shown.
`reference` is skipped when its [N, V] float32 logits (x4: value, softmax, cotangents) would not
fit in device memory. Pallas kernels for another platform are skipped unless --interpret.

  python scripts/bench_logprobs.py                                  # full grid, all impls
  python scripts/bench_logprobs.py --n=256 --d=128 --v=1000,32000 --impls=reference,blockwise
"""
import argparse
import datetime
import json
import logging
import statistics
import time

import jax
import jax.numpy as jnp

from jpost import ops
from jpost.ops import logprobs
from jpost.train import metrics as tmetrics
from jpost.train.flops import peak_flops

PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}


def timed(fn, args, warmup, repeats):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_one(impl, n, d, v, dtype, args, block_sizes):
  key = jax.random.key(0)
  kh, kw, kl = jax.random.split(key, 3)
  h = jax.random.normal(kh, (n, d), dtype)
  w = (jax.random.normal(kw, (d, v), jnp.float32) / d ** 0.5).astype(dtype)
  labels = jax.random.randint(kl, (n,), 0, v, jnp.int32)
  kw_ = dict(with_entropy=args.entropy, impl=impl, block_sizes=block_sizes)

  def fwd(h, w, labels):
    return ops.token_logprobs(h, w, labels, **kw_)

  def loss(h, w, labels):
    lp, ent = ops.token_logprobs(h, w, labels, **kw_)
    return jnp.sum(lp) + (jnp.sum(ent) if ent is not None else 0.0)

  row = {}
  for name, f in (("fwd", fwd), ("fwdbwd", jax.value_and_grad(loss, (0, 1)))):
    compiled = jax.jit(f).lower(h, w, labels).compile()
    mem = compiled.memory_analysis()
    row[f"{name}_temp_bytes"] = None if mem is None else int(mem.temp_size_in_bytes)
    row[f"{name}_s"] = timed(compiled, (h, w, labels), args.warmup, args.repeats)
  return row


def fmt_bytes(b):
  return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--impls", default="reference,blockwise,pallas_gpu,pallas_tpu")
  p.add_argument("--n", default="4096,16384")
  p.add_argument("--d", default="2048,4096")
  p.add_argument("--v", default="32000,128256,151936,256000")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--entropy", action="store_true", help="also compute the entropy")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--block-sizes", default=None, help='JSON, e.g. {"token": 1024, "vocab": 2048}')
  p.add_argument("--interpret", action="store_true",
                 help="run Pallas kernels of another platform in interpret mode (correctness "
                      "only; the times mean nothing)")
  p.add_argument("--json", default="bench_logprobs.json")
  args = p.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

  device = jax.devices()[0]
  backend, kind = jax.default_backend(), device.device_kind
  peak, mem_limit = peak_flops(kind), tmetrics.device_memory_limit(device)
  dtype = jnp.dtype(args.dtype)
  user_blocks = json.loads(args.block_sizes) if args.block_sizes else {}
  meta = {"device": kind, "backend": backend, "jax": jax.__version__, "dtype": args.dtype,
          "entropy": args.entropy, "peak_bf16_flops": peak,
          "date": datetime.date.today().isoformat(), "block_sizes": user_blocks}
  print(f"# token_logprobs on {kind} ({backend}), jax {jax.__version__}, {args.dtype}, "
        f"entropy={args.entropy}, peak bf16 {peak or 'unknown'} FLOP/s")
  rows = []
  header = ("| impl | N | D | V | fwd ms | fwd+bwd ms | fwd temp | fwd+bwd temp | "
            "fwd % peak | fwd+bwd % peak | note |")
  print(header + "\n|" + "---|" * 11)
  for impl in args.impls.split(","):
    blocks = dict(user_blocks)
    if impl in PLATFORM and PLATFORM[impl] != backend:
      if not args.interpret:
        print(f"| {impl} | | | | | | | | | | skipped: needs a {PLATFORM[impl]} (or --interpret) |")
        continue
      blocks["interpret"] = True
    for n in map(int, args.n.split(",")):
      for d in map(int, args.d.split(",")):
        for v in map(int, args.v.split(",")):
          row = dict(impl=impl, N=n, D=d, V=v, note="")
          if impl == "reference" and 4 * n * v * 4 > 0.9 * mem_limit:
            row["note"] = (f"skipped: [N, V] float32 logits x4 = {4 * n * v * 4 / 2**30:.1f} GiB "
                           f"> device memory {mem_limit / 2**30:.1f} GiB")
          else:
            row.update(bench_one(impl, n, d, v, dtype, args, blocks or None))
            if impl in PLATFORM and any(
                err for (_, i, _, shapes), err in logprobs._probed.items()
                if i == impl and shapes[:2] == ((n, d), (d, v))):
              row["note"] = "kernel failed its probe: fell back to blockwise (see log)"
            for name, flops in (("fwd", 2 * n * d * v), ("fwdbwd", 8 * n * d * v)):
              row[f"{name}_peak_frac"] = flops / row[f"{name}_s"] / peak if peak else None
          rows.append(row)
          pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
          ms = lambda x: "" if x is None else f"{1e3 * x:.2f}"  # noqa: E731
          print(f"| {impl} | {n} | {d} | {v} | {ms(row.get('fwd_s'))} | "
                f"{ms(row.get('fwdbwd_s'))} | {fmt_bytes(row.get('fwd_temp_bytes'))} | "
                f"{fmt_bytes(row.get('fwdbwd_temp_bytes'))} | {pct(row.get('fwd_peak_frac'))} | "
                f"{pct(row.get('fwdbwd_peak_frac'))} | {row['note']} |", flush=True)
  with open(args.json, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
