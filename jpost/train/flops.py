"""Model FLOPs and device peaks: the one count behind MFU in the train loop and the benchmarks.

Per sequence of T tokens (the PaLM / MaxText model-FLOPs convention):
  forward   2 * P_mm * T + 4 * L * d_attn * A(T)
  training  3 x forward (forward, activation gradients, weight gradients)
with P_mm the weights that multiply activations (per layer q, k, v, o and the 3 MLP matrices,
plus the D x V unembedding; the embedding gather and norms count nothing), d_attn = heads x
head_dim, and A(T) = T^2 / 2 the causal (query, key) pairs (W * T - W^2 / 2 on sliding-window
layers when T > W). Remat's recomputation is not model FLOPs. A frozen base (LoRA) has no weight
gradients: its matmuls count 2 x forward, attention still 3 x; the adapters' own FLOPs (rank r
against D) are left out.
"""
import numpy as np

# Dense bf16 peak FLOP/s per device kind (vendor figures), matched as substrings of
# `device_kind`, longest name first; unknown kinds report no MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak of one device of this kind, None if unknown (CPU included)."""
  for name, flops in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if name.lower() in device_kind.lower():
      return flops
  return None


def matmul_params(cfg) -> int:
  """Weights multiplied with every token's activations (see the module docstring)."""
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  per_layer = d * h * k + 2 * d * g * k + h * k * d + 3 * d * f
  return cfg.num_layers * per_layer + d * cfg.vocab_size


def causal_pairs(t: int, window: int | None = None) -> float:
  """(query, key) pairs one sequence of t tokens scores: t^2 / 2 (the model-FLOPs convention)."""
  if window is None or t <= window:
    return t * t / 2
  return window * t - window * window / 2


def attention_pairs(cfg, t: int) -> float:
  """Causal pairs summed over layers (windowed layers see at most `sliding_window` keys)."""
  return sum(causal_pairs(t, cfg.sliding_window if w else None) for w in cfg.sliding_layers())


def _attention_flops(cfg, seq: int) -> float:
  """Forward QK^T and PV of one sequence."""
  return 4 * cfg.num_heads * cfg.head_dim * attention_pairs(cfg, seq)


def forward_flops(cfg, rows: int, seq: int) -> float:
  return rows * (2 * matmul_params(cfg) * seq + _attention_flops(cfg, seq))


def train_flops(cfg, rows: int, seq: int, *, frozen_base: bool = False) -> float:
  """Forward + backward; `frozen_base`: no weight gradients for the model's matmuls (LoRA)."""
  if not frozen_base:
    return 3 * forward_flops(cfg, rows, seq)
  return rows * (4 * matmul_params(cfg) * seq + 3 * _attention_flops(cfg, seq))


def train_flops_per_token(cfg, seq: int, *, extra_forwards: int = 0,
                          frozen_base: bool = False) -> float:
  """One training token at sequence length `seq`, plus `extra_forwards` no-gradient passes over
  it (a reference model, KTO's mismatched pairs)."""
  total = train_flops(cfg, 1, seq, frozen_base=frozen_base)
  return (total + extra_forwards * forward_flops(cfg, 1, seq)) / seq


def prefill_flops(cfg, batch: int, prompt_len: int) -> float:
  """Prompt forward; the sampler unembeds only the last position."""
  trunk = 2 * (matmul_params(cfg) - cfg.d_model * cfg.vocab_size) * prompt_len
  return batch * (trunk + 2 * cfg.d_model * cfg.vocab_size + _attention_flops(cfg, prompt_len))


def decode_flops(cfg, batch: int, prompt_len: int, new_tokens: int) -> float:
  """N - 1 one-token steps; the step feeding token i (1-based) attends to P + i keys."""
  steps = new_tokens - 1
  keys = steps * prompt_len + steps * (steps + 1) / 2
  d_attn = cfg.num_heads * cfg.head_dim
  if int(np.sum(cfg.sliding_layers())) and prompt_len + new_tokens > cfg.sliding_window:
    raise ValueError("decode FLOPs with a sliding window shorter than the context are not "
                     "counted: lower --prompt_len + --new_tokens")
  return batch * (2 * matmul_params(cfg) * steps + 4 * d_attn * cfg.num_layers * keys)
