"""`ModelConfig`: one frozen dataclass describes every supported decoder by flags.

Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3 and Gemma 2 differ only in a handful of switches (biases,
norms, soft-caps, RoPE variant, attention windows), so they share one implementation
(`jpost.models.decoder`). The dataclass is frozen and made of hashable fields because jitted
functions close over it as a static argument.
"""
import dataclasses
import json

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2")
ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_TYPES = ("default", "llama3")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
# Full-sequence attention kernels (jpost.models.attention.attend); KV-cache decode steps always
# take the XLA path.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "custom"
  family: str = "llama"             # the HF `model_type` written by save_hf
  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2             # GQA; 1 = MQA; num_heads = MHA
  head_dim: int = 16                # explicit: Qwen3, Gemma 2 have head_dim != d_model / num_heads
  mlp_dim: int = 128
  activation: str = "silu"          # gated MLP: act(x W_gate) * (x W_up); Gemma 2: gelu_tanh
  norm_eps: float = 1e-5
  norm_plus_one: bool = False       # Gemma: RMSNorm scales by (1 + w), w initialised at 0
  sandwich_norms: bool = False      # Gemma 2: extra norms after attention and after the MLP
  qkv_bias: bool = False            # Qwen2: biases on the q/k/v projections
  qk_norm: bool = False             # Qwen3: RMSNorm over head_dim on q and k before RoPE
  tie_embeddings: bool = False      # unembedding = embedding.T
  embed_scale: bool = False         # Gemma: embeddings * sqrt(d_model) (in the compute dtype)
  # RoPE. 'llama3' rescales low frequencies (Llama 3.1 / 3.2 long context).
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  max_position_embeddings: int = 8192
  # Attention. Scale = query_pre_attn_scalar ** -0.5 (Gemma 2) or head_dim ** -0.5 when None.
  query_pre_attn_scalar: float | None = None
  attn_softcap: float | None = None     # Gemma 2: cap * tanh(scores / cap) before the mask
  final_softcap: float | None = None    # Gemma 2: the same on the output logits
  # Sliding-window attention: a query sees keys with q_index - k_index < sliding_window. Layer i is
  # windowed when i % sliding_window_pattern == 0 (Mistral: 1 = every layer; Gemma 2: 2).
  sliding_window: int | None = None
  sliding_window_pattern: int = 1
  # Special tokens, carried only so save_hf writes a complete config.json.
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  # Execution. Mixed precision: weights are stored in `param_dtype` (the optimiser state follows
  # them) and cast to `dtype` where used; norms, softmax and log-probs run in float32 regardless.
  dtype: str = "bfloat16"           # compute dtype (activations, matmul inputs)
  param_dtype: str = "float32"      # stored (master) weights and the optimiser state
  remat: str = "none"               # 'none' | 'full' | 'dots' | 'dots_no_batch'
  # 'auto': the backend's fused kernel where it applies (cuDNN flash on GPU, splash on TPU),
  # else XLA's attention; 'xla': always the explicit path; 'cudnn' (GPU) / 'splash' (TPU): the
  # kernels, which fail with a clear error elsewhere. See jpost.models.attention.attend.
  attention_impl: str = "auto"

  def __post_init__(self):
    problems = []
    if self.family not in FAMILIES:
      problems.append(f"family={self.family!r} (expected one of {FAMILIES})")
    if self.activation not in ACTIVATIONS:
      problems.append(f"activation={self.activation!r} (expected one of {ACTIVATIONS})")
    if self.rope_type not in ROPE_TYPES:
      problems.append(f"rope_type={self.rope_type!r} (expected one of {ROPE_TYPES})")
    if self.remat not in REMAT_POLICIES:
      problems.append(f"remat={self.remat!r} (expected one of {REMAT_POLICIES})")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPES:
        problems.append(f"{name}={getattr(self, name)!r} (expected one of {DTYPES})")
    if self.attention_impl not in ATTENTION_IMPLS:
      problems.append(f"attention_impl={self.attention_impl!r} (expected one of "
                      f"{ATTENTION_IMPLS})")
    if self.attention_impl == "cudnn" and self.attn_softcap is not None:
      problems.append("attention_impl='cudnn' cannot soft-cap attention scores "
                      f"(attn_softcap={self.attn_softcap}): use 'xla'")
    if self.attention_impl == "splash" and self.sliding_window is not None:
      problems.append("attention_impl='splash' is not wired for sliding-window attention "
                      f"(sliding_window={self.sliding_window}): use 'xla' or 'auto'")
    if self.num_heads % self.num_kv_heads:
      problems.append(f"num_heads={self.num_heads} is not a multiple of "
                      f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      problems.append(f"head_dim={self.head_dim} must be even for RoPE")
    if self.sliding_window_pattern < 1:
      problems.append(f"sliding_window_pattern={self.sliding_window_pattern} must be >= 1")
    if problems:
      raise ValueError(f"ModelConfig {self.name!r}: " + "; ".join(problems))
    if isinstance(self.eos_token_id, list):   # JSON round trips give lists; keep it hashable
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  def sliding_layers(self) -> np.ndarray:
    """[num_layers] bool: which layers use the sliding window (all False without a window)."""
    layer = np.arange(self.num_layers)
    if self.sliding_window is None:
      return np.zeros(self.num_layers, bool)
    return layer % self.sliding_window_pattern == 0

  @property
  def attn_scale(self) -> float:
    base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(base) ** -0.5


def _llama3_rope(**kw):
  return dict(rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
              rope_original_max_len=8192, **kw)


_QWEN = dict(norm_eps=1e-6, rope_theta=1_000_000.0, eos_token_id=151643, bos_token_id=151643)
_GEMMA2 = dict(family="gemma2", vocab_size=256000, head_dim=256, activation="gelu_tanh",
               norm_eps=1e-6, norm_plus_one=True, sandwich_norms=True, tie_embeddings=True,
               embed_scale=True, query_pre_attn_scalar=256, attn_softcap=50.0,
               final_softcap=30.0, sliding_window=4096, sliding_window_pattern=2,
               bos_token_id=2, eos_token_id=1, pad_token_id=0)

# Hyper-parameters from each model's config.json on the HF Hub.
_NAMED = {
    # Llama-style toy used by tests and CPU demos (float32 compute: CPU bf16 matmuls are slow).
    "tiny": dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, mlp_dim=128, max_position_embeddings=2048, dtype="float32"),
    "llama3_2_1b": dict(vocab_size=128256, d_model=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500000.0,
                        tie_embeddings=True, max_position_embeddings=131072,
                        bos_token_id=128000, eos_token_id=128001,
                        **_llama3_rope(rope_factor=32.0)),
    "llama3_8b": dict(vocab_size=128256, d_model=4096, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_theta=500000.0,
                      max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001),
    # Mistral-7B-v0.1 (the release with the 4096-token sliding window).
    "mistral_7b": dict(family="mistral", vocab_size=32000, d_model=4096, num_layers=32,
                       num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14336,
                       sliding_window=4096, max_position_embeddings=32768, bos_token_id=1,
                       eos_token_id=2),
    "qwen2_5_0_5b": dict(family="qwen2", vocab_size=151936, d_model=896, num_layers=24,
                         num_heads=14, num_kv_heads=2, head_dim=64, mlp_dim=4864, qkv_bias=True,
                         tie_embeddings=True, max_position_embeddings=32768, **_QWEN),
    "qwen2_5_7b": dict(family="qwen2", vocab_size=152064, d_model=3584, num_layers=28,
                       num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944, qkv_bias=True,
                       max_position_embeddings=131072, **_QWEN),
    "qwen3_0_6b": dict(family="qwen3", vocab_size=151936, d_model=1024, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072, qk_norm=True,
                       tie_embeddings=True, max_position_embeddings=40960, **_QWEN),
    "qwen3_1_7b": dict(family="qwen3", vocab_size=151936, d_model=2048, num_layers=28,
                       num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=6144, qk_norm=True,
                       tie_embeddings=True, max_position_embeddings=40960, **_QWEN),
    "qwen3_8b": dict(family="qwen3", vocab_size=151936, d_model=4096, num_layers=36,
                     num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=12288, qk_norm=True,
                     max_position_embeddings=40960, **_QWEN),
    "gemma2_2b": dict(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, mlp_dim=9216,
                      **_GEMMA2),
    "gemma2_9b": dict(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8, mlp_dim=14336,
                      **_GEMMA2),
}
# Aliases in the spelling some configs use (`model=qwen3_0p6b`).
_ALIASES = {"qwen3_0p6b": "qwen3_0_6b", "qwen3_1p7b": "qwen3_1_7b", "qwen2_5_0p5b": "qwen2_5_0_5b",
            "llama3_2_1B": "llama3_2_1b"}


def model_names() -> tuple[str, ...]:
  return tuple(_NAMED)


def get_model_config(name: str, **overrides) -> ModelConfig:
  """A named config (`tiny`, `llama3_2_1b`, ...), optionally with fields replaced."""
  key = _ALIASES.get(name, name)
  if key not in _NAMED:
    import difflib
    hint = difflib.get_close_matches(key, _NAMED, n=1)
    raise ValueError(f"unknown model config {name!r}"
                     + (f"; did you mean {hint[0]!r}?" if hint else "")
                     + f" (known: {', '.join(_NAMED)})")
  return ModelConfig(**{"name": key, **_NAMED[key], **overrides})


def write_model_config_json(cfg: ModelConfig, path: str) -> None:
  """jpost's own description of the model (used to rebuild it from a workdir, e.g. for export)."""
  from etils import epath   # local or gs:// workdirs
  epath.Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True))


def read_model_config_json(path: str) -> ModelConfig:
  from etils import epath   # local or gs:// workdirs
  raw = json.loads(epath.Path(path).read_text())
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(raw) - known)
  if unknown:
    raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
  return ModelConfig(**raw)
