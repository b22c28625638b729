"""What `jpost.models.decoder.Proj` calls so that adapters need no model rewrite.

The decoder's params stay the model's params; `jpost.adapters.lora.attach` only adds leaves next
to a targeted projection's `kernel` (and QLoRA replaces `kernel` by its quantised form). Because
they sit inside the stacked `layers` subtree, `nn.scan` slices them per layer like the weights,
so each layer sees only its own adapter and dequantises only its own kernel:

  kernel_int8 / kernel_scale, kernel_nf4 / kernel_absmax   quantised base (jpost.adapters.quant)
  kernel_absmax_q8 / _scale / _mean (for kernel_absmax)    its double-quantised NF4 absmax
  lora_a [r, *in]                                          LoRA A (this layer)
  lora_b [*out, r]                                         LoRA B, already scaled by alpha / r
  lora_dropout_key [2] uint32, lora_dropout_rate []        training only: dropout on the input

Without these leaves both functions leave the projection exactly as it was.
"""
import jax
import jax.numpy as jnp

from jpost.adapters import quant


def _leaves(module, names):
  return {n: module.get_variable("params", n) for n in names}


def quantized_kernel(module, shape, eqn, dtype):
  """The dequantised kernel of this layer if the base is stored quantised, else None."""
  for kind, names in quant.LEAVES.items():
    if all(module.has_variable("params", n) for n in names):
      return quant.dequantize_layer(kind, _leaves(module, names), shape, _n_in(eqn), dtype)
  return None


def _n_in(eqn):
  """Number of leading kernel dims contracted with the input ('btd,dhk->bthk' -> 1)."""
  x_subs, kernel_subs = eqn.split("->")[0].split(",")
  n_in = sum(1 for c in kernel_subs if c in x_subs)
  if any(c not in x_subs for c in kernel_subs[:n_in]):
    raise ValueError(f"adapters need the contracted dims first in the kernel; got {eqn!r}")
  return n_in


def with_lora(module, eqn, x, y, dtype):
  """y + dropout(x) A^T B^T (B pre-scaled by alpha / r) when this projection has an adapter."""
  if not module.has_variable("params", "lora_a"):
    return y
  a = module.get_variable("params", "lora_a").astype(dtype)
  b = module.get_variable("params", "lora_b").astype(dtype)
  if module.has_variable("params", "lora_dropout_key"):
    key = module.get_variable("params", "lora_dropout_key")
    rate = module.get_variable("params", "lora_dropout_rate")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
  x_subs, kernel_subs = eqn.split("->")[0].split(",")
  out_subs = eqn.split("->")[1]
  if "r" in eqn:
    raise ValueError(f"LoRA hook: einsum {eqn!r} already uses the rank letter 'r'")
  n_in = _n_in(eqn)
  in_subs, w_out_subs = kernel_subs[:n_in], kernel_subs[n_in:]
  batch_subs = "".join(c for c in x_subs if c not in in_subs)
  h = jnp.einsum(f"{x_subs},r{in_subs}->{batch_subs}r", x, a)
  return y + jnp.einsum(f"{batch_subs}r,{w_out_subs}r->{out_subs}", h, b)
