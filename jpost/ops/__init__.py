"""The fused log-prob hot path: token_logprobs / token_kl and their implementations.

See docs/architecture.md ("The hot path") for the contract and docs/benchmarks.md for numbers.
"""
from jpost.ops import lm_head, sharded
from jpost.ops.logprobs import AUTO_IMPL, IMPLS, token_kl, token_logprobs
from jpost.ops.spec import BlockSizes

__all__ = ["AUTO_IMPL", "IMPLS", "BlockSizes", "lm_head", "sharded", "token_kl",
           "token_logprobs"]
