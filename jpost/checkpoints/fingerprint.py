"""Fingerprints of parameter pytrees, computed where the arrays live.

Per leaf, two position-dependent 32-bit sums of its raw bits (MurmurHash3's finaliser mixes
each element with its flat index). Integer addition wraps mod 2**32 and is associative, so the
value does not depend on how a leaf is sharded or reduced: every process of a multi-host job gets
the same fingerprint from its own shards, without gathering the params on a host (an 8B model
would be 16 GB on one host), and a float checksum's tolerance, which a small change of the
weights could slip through, is not needed. Used for the reference cache's key
(`jpost.train.ref_cache`) and a LoRA checkpoint's frozen base (`jpost.checkpoints.train_ckpt`).
"""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np


def _fmix32(x):
  """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with p ~ 1/2."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _bits32(x):
  """Any array -> its raw bits as a flat uint32 vector (one element per 1-4 bytes)."""
  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def leaf_lanes(params):
  """[leaves, 2] uint32: two position-dependent sums of each leaf's bits (module docstring)."""
  out = []
  for leaf in jax.tree.leaves(params):
    bits = _bits32(leaf)
    idx = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    out.append(jnp.stack([jnp.sum(_fmix32(bits ^ _fmix32(idx * jnp.uint32(2) + jnp.uint32(seed))),
                                  dtype=jnp.uint32) for seed in (1, 0x9E3779B9)]))
  return jnp.stack(out)


def params_fingerprint(params) -> str:
  """A fingerprint of a params pytree's structure, shapes, dtypes and bytes (hex)."""
  h = hashlib.sha256(str(jax.tree.structure(params)).encode())
  for leaf in jax.tree.leaves(params):
    h.update(f"{leaf.shape}{leaf.dtype};".encode())
  h.update(np.asarray(host_lanes(params)).tobytes())
  return h.hexdigest()


def host_lanes(params) -> np.ndarray:
  """`leaf_lanes` as a host array, on every process (params may span several)."""
  lanes = leaf_lanes(params)
  if lanes.is_fully_addressable:
    return np.asarray(lanes)
  if lanes.is_fully_replicated:
    return np.asarray(lanes.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(lanes, tiled=True))
