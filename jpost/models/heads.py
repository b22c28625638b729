"""Small heads on the decoder's hidden states: the scalar reward / value head.

A head is a plain params dict {'w': [D], 'b': []} kept beside the language model's params
(`params = {'lm': ..., 'reward_head': ...}`), so the decoder itself stays unchanged.
"""
import jax
import jax.numpy as jnp


def init_scalar_head(d_model: int, rng=None):
  # Zero init: a fresh reward model scores every sequence 0, so early Bradley-Terry gradients come
  # from the language model features, not from a random projection.
  del rng
  return {"w": jnp.zeros((d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def scalar(head, h_BTD):
  """Per-token scalar [B, T] in float32 (value head)."""
  return jnp.einsum("btd,d->bt", h_BTD.astype(jnp.float32), head["w"]) + head["b"]


def last_token_index(batch, prefix=""):
  """Flat index (into B*T) of each example's last token -> [S] (packed rows work too)."""
  seq_N = batch[prefix + "seq_index"].reshape(-1)
  flat_N = jnp.arange(seq_N.shape[0])
  num = batch[prefix + "example_valid"].shape[0] if prefix + "example_valid" in batch \
      else batch["example_valid"].shape[0]
  last = jax.ops.segment_max(flat_N, seq_N, num_segments=num)
  # Padding examples have no tokens (segment_max gives the dtype minimum): point them at 0.
  return jnp.maximum(last, 0)


def last_token_scalar(head, h_BTD, batch):
  """Reward of each example read at its last token (its EOS) -> [S] float32."""
  d = h_BTD.shape[-1]
  h_ND = h_BTD.reshape(-1, d)
  h_SD = h_ND[last_token_index(batch)]
  return scalar(head, h_SD[None])[0]
