"""Peak temporary memory of value_and_grad, from the compiled executable: blockwise never holds
[N, V] logits; the reference does (which shows the measurement sees them)."""
import jax
import jax.numpy as jnp

from jpost import ops

N, D, V = 4096, 256, 32768
LOGITS_BYTES = N * V * 4


def _temp_bytes(impl):
  def loss(h, w, labels):
    lp, ent = ops.token_logprobs(h, w, labels, with_entropy=True, impl=impl)
    return jnp.sum(lp) + jnp.sum(ent)
  compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(
      jax.ShapeDtypeStruct((N, D), jnp.bfloat16), jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
      jax.ShapeDtypeStruct((N,), jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_temp_memory_is_a_small_fraction_of_the_logits():
  blockwise, reference = _temp_bytes("blockwise"), _temp_bytes("reference")
  print(f"\ntemp bytes at N={N} D={D} V={V} bf16: blockwise {blockwise} "
        f"({blockwise / LOGITS_BYTES:.2%} of N*V*4), reference {reference} "
        f"({reference / LOGITS_BYTES:.2%})")
  assert reference > LOGITS_BYTES
  assert blockwise <= 0.05 * LOGITS_BYTES
