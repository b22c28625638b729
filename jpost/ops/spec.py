"""Static configuration of one token_logprobs / token_kl call (hashable: a custom_vjp nondiff arg).

`BlockSizes` is what users pass; `OpSpec` is the resolved form an implementation receives, with
the block sizes filled in per implementation and the interpret decision taken.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes and kernel options; None = the implementation's default.

  token: tokens per tile (bn). vocab: vocabulary columns per tile (bv). hidden: contraction chunk
  (pallas_tpu forward grid axis; pallas_gpu in-kernel loop). splits: pallas_gpu only, how many
  programs share one row of tiles (more parallelism, more partial-sum memory). interpret: run a
  Pallas kernel in interpret mode (None = automatically when the backend is not the kernel's).
  num_warps / num_stages: Triton launch options (pallas_gpu).
  """
  token: int | None = None
  vocab: int | None = None
  hidden: int | None = None
  splits: int | None = None
  interpret: bool | None = None
  num_warps: int | None = None
  num_stages: int | None = None

  @classmethod
  def of(cls, value):
    if value is None:
      return cls()
    if isinstance(value, cls):
      return value
    if isinstance(value, dict):
      return cls(**value)
    raise TypeError(f"block_sizes must be BlockSizes, dict or None, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class OpSpec:
  temperature: float = 1.0
  softcap: float | None = None
  with_entropy: bool = False
  blocks: BlockSizes = BlockSizes()
  interpret: bool = False


def next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())
