"""TPU slice arithmetic: accelerator type -> chips, hosts (workers), HBM, runtime, mesh, batch.

Pure Python (no jax): the launcher runs on a laptop that may not have jpost's dependencies.
Sources: Cloud TPU docs (v5e, v5p, v6e system architecture and runtime-version pages).

- v5e (`v5litepod-N`) and v6e (`v6e-N`): N = chips (one TensorCore per chip). Slices of 1, 4 and
  8 chips are one VM; bigger slices are VMs of 4 chips each (v5litepod-16 = 4 workers).
- v5p (`v5p-N`) and v4 (`v4-N`): N = TensorCores = 2 x chips; 4 chips per VM
  (v5p-8 = 4 chips on 1 worker, v5p-64 = 32 chips on 8 workers).
"""
import dataclasses
import math
import re

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
  prefix: str            # accelerator-type prefix gcloud expects
  cores_per_chip: int    # what the number in the accelerator type counts, per chip
  hbm_gib: float         # per chip
  runtime: str           # default --version / --runtime-version for JAX
  single_host: tuple     # chip counts served by one VM; larger slices use 4-chip VMs
  sizes: tuple           # valid N in `<prefix>-N`


_V5P_SIZES = tuple(range(8, 12289, 8))
GENERATIONS = {
    "v5e": Generation("v5litepod", 1, 16, "v2-alpha-tpuv5-lite", (1, 4, 8),
                      (1, 4, 8, 16, 32, 64, 128, 256)),
    "v5p": Generation("v5p", 2, 95, "v2-alpha-tpuv5", (4,), _V5P_SIZES),
    "v6e": Generation("v6e", 1, 32, "v2-alpha-tpuv6e", (1, 4, 8),
                      (1, 4, 8, 16, 32, 64, 128, 256)),
    "v4": Generation("v4", 2, 32, "tpu-ubuntu2204-base", (4,), tuple(range(8, 8193, 8))),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5e": "v5e", "v5p": "v5p", "v6e": "v6e",
            "v4": "v4"}

# Exact parameter counts of jpost's named configs (tests/launch checks them against
# jpost.models), so the launcher can size meshes without importing jax.
MODEL_PARAMS = {"llama3_2_1b": 1_235_814_400, "llama3_8b": 8_030_261_248,
                "qwen2_5_7b": 7_615_616_512}
# (num_layers, d_model, mlp_dim, num_heads) for the activation estimate.
MODEL_SHAPES = {"llama3_2_1b": (16, 2048, 8192, 32), "llama3_8b": (32, 4096, 14336, 32),
                "qwen2_5_7b": (28, 3584, 18944, 28)}


@dataclasses.dataclass(frozen=True)
class Slice:
  accelerator_type: str   # normalised, as gcloud wants it
  generation: str
  chips: int
  hosts: int
  chips_per_host: int
  hbm_gib_per_chip: float
  runtime: str

  @property
  def hbm_gib(self) -> float:
    return self.chips * self.hbm_gib_per_chip


def parse(accelerator_type: str) -> Slice:
  """'v5litepod-16' (or the alias 'v5e-16') -> Slice(chips=16, hosts=4, ...)."""
  m = re.fullmatch(r"\s*(v\d+[a-z]*)-(\d+)\s*", accelerator_type.lower())
  if not m or m.group(1) not in _ALIASES:
    raise ValueError(f"accelerator type {accelerator_type!r}: expected e.g. v5litepod-8, "
                     f"v5p-64, v6e-16 (generations: {', '.join(GENERATIONS)})")
  name, n = _ALIASES[m.group(1)], int(m.group(2))
  gen = GENERATIONS[name]
  if n not in gen.sizes:
    shown = gen.sizes if len(gen.sizes) < 12 else f"multiples of 8 from 8 to {gen.sizes[-1]}"
    raise ValueError(f"accelerator type {accelerator_type!r}: {gen.prefix}-N needs N in {shown}")
  chips = n // gen.cores_per_chip
  per_host = chips if chips in gen.single_host else 4
  return Slice(f"{gen.prefix}-{n}", name, chips, chips // per_host, per_host, gen.hbm_gib,
               gen.runtime)


def state_bytes_per_param(*, param_dtype: str = "float32", with_ref: bool = False) -> int:
  """Resident bytes per parameter for full fine-tuning with AdamW.

  params + grads + Adam mu and nu, all in the master dtype (optax keeps moments in the params'
  dtype); a preference loss adds a frozen reference copy.
  """
  b = {"float32": 4, "bfloat16": 2}[param_dtype]
  return 4 * b + (b if with_ref else 0)


def fsdp_options(sl: Slice, model: str, *, param_dtype="float32", with_ref=True,
                 state_fraction=0.5) -> list[tuple[int, int]]:
  """(data, fsdp) meshes whose sharded train state fits in `state_fraction` of each chip's HBM.

  The smallest fitting fsdp group leaves the most room for a data axis (fewer all-gathers per
  step); fsdp over the whole slice leaves the most HBM for activations. Empty if nothing fits.
  """
  state = MODEL_PARAMS[model] * state_bytes_per_param(param_dtype=param_dtype, with_ref=with_ref)
  budget = state_fraction * sl.hbm_gib_per_chip * GIB
  fits = [f for f in _divisors(sl.chips) if state / f <= budget]
  if not fits:
    return []
  return sorted({(sl.chips // fits[0], fits[0]), (1, sl.chips)}, key=lambda df: -df[0])


def rows_per_chip(sl: Slice, model: str, fsdp: int, *, seq_len=2048, param_dtype="float32",
                  with_ref=True, hbm_fraction=0.85) -> int:
  """Estimated sequences per chip per micro-batch with `model.remat=full` (a power of two).

  Memory model (an estimate, not a measurement): after the sharded state, each row keeps one
  bf16 [T, D] input per layer (remat=full) plus one layer's working set: bf16 projections and
  the MLP, and float32 attention scores and probabilities [H, T, T]. Zero means it does not fit.
  """
  layers, d, mlp, heads = MODEL_SHAPES[model]
  state = MODEL_PARAMS[model] * state_bytes_per_param(param_dtype=param_dtype,
                                                      with_ref=with_ref) / fsdp
  free = hbm_fraction * sl.hbm_gib_per_chip * GIB - state
  per_row = seq_len * (layers * d * 2 + 2 * (6 * d + 3 * mlp)) + 2 * heads * seq_len ** 2 * 4
  rows = int(free // per_row) if free > 0 else 0
  return 2 ** int(math.log2(rows)) if rows >= 1 else 0


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def describe(accelerator_type: str, model: str | None = None, *, seq_len=2048,
             param_dtype="float32", with_ref=True) -> str:
  """Human summary printed by `python tpu/launch.py plan ...`."""
  sl = parse(accelerator_type)
  lines = [f"{sl.accelerator_type}: {sl.chips} chips on {sl.hosts} host(s) "
           f"({sl.chips_per_host} per host), {sl.hbm_gib_per_chip:g} GiB HBM per chip "
           f"({sl.hbm_gib:g} GiB total), runtime {sl.runtime}"]
  if model is None:
    return "\n".join(lines)
  if model not in MODEL_PARAMS:
    raise ValueError(f"model {model!r}: sizing known for {sorted(MODEL_PARAMS)}")
  per_param = state_bytes_per_param(param_dtype=param_dtype, with_ref=with_ref)
  total = MODEL_PARAMS[model] * per_param / GIB
  lines.append(f"{model}: {MODEL_PARAMS[model] / 1e9:.2f}B params, train state "
               f"{total:.0f} GiB ({per_param} bytes/param: {param_dtype} AdamW"
               f"{' + reference' if with_ref else ''})")
  options = fsdp_options(sl, model, param_dtype=param_dtype, with_ref=with_ref)
  if not options and param_dtype == "float32":
    bf16 = describe(accelerator_type, model, seq_len=seq_len, param_dtype="bfloat16",
                    with_ref=with_ref).split("\n", 1)[1]
    return "\n".join(lines + ["  does not fit in float32; with "
                               "--config.model.param_dtype=bfloat16 (bf16 master weights and "
                               "Adam moments: less precise updates):", bf16])
  if not options:
    lines.append("  does not fit: use a bigger slice")
  for data, fsdp in options:
    rows = rows_per_chip(sl, model, fsdp, seq_len=seq_len, param_dtype=param_dtype,
                         with_ref=with_ref)
    batch = rows * data * fsdp
    lines.append(f"  --config.mesh.data={data} --config.mesh.fsdp={fsdp}: state "
                 f"{total / fsdp:.1f} GiB/chip; ~{rows} rows/chip at T={seq_len} with "
                 f"remat=full -> micro-batch {batch} rows (estimate)")
  return "\n".join(lines)
