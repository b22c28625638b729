"""End-of-run Hugging Face export of a run's params, streamed tensor by tensor over all hosts.

On several processes each host holds only its shards of the params. Gathering the whole tree to
every host (`process_allgather(params)`) needs the full model in every host's RAM; here each
HF tensor (one layer of one stacked param) is gathered on its own: a jitted function slices it
out of the global params (merging LoRA adapters into it), replicated over the mesh, and process
0 copies it to the host and writes it into the open safetensors file (`models.hf`'s streamed
writer, same shard plan and bytes as `models.save_hf`). Every process runs the same sequence of
gathers (each one a collective); the others drop the result. Peak host memory on process 0:
about one tensor (plus its HF-layout copy), whatever the shard size; device memory: one
replicated tensor per device at a time. The export directory may be an object store (gs://).

LoRA runs: the adapters live in the layers only, so the slice of layer i of `params['lm']` and
`params['lora']` goes through `lora.export_lm` (dequantise the base, add (alpha / r) A^T B^T) as a
one-layer model: the merge runs per layer on the devices, never on a whole host copy.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jpost.adapters import lora as lora_adapters
from jpost.models import hf


def save_hf(params, lora_section, model_cfg, path: str, *, dtype=None,
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Writes `params` (a run's state params: `{'lm', maybe 'lora', heads}` of global jax.Arrays)
  as merged HF weights to `path`; a collective: every process calls it, process 0 writes."""
  abstract = jax.eval_shape(lambda p: lora_adapters.export_lm(p, lora_section, model_cfg), params)
  if dtype is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype)), abstract)
  one_layer = dataclasses.replace(model_cfg, num_layers=1)
  sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  replicated = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                if isinstance(mesh, jax.sharding.Mesh) else None)
  parts = {k: params[k] for k in ("lm", "lora") if k in params}
  fns = {}

  def tensor_fn(path_, stacked):
    def one(parts, layer):
      if not stacked:   # embeddings, final norm, untied head: never adapted
        value = lora_adapters.get_path(parts["lm"], path_)
      else:
        sliced = {k: {"layers": jax.tree.map(
            lambda x: lax.dynamic_index_in_dim(x, layer, 0, keepdims=True), v["layers"])}
                  for k, v in parts.items()}
        value = lora_adapters.get_path(
            lora_adapters.export_lm(sliced, lora_section, one_layer), path_)[0]
      return value.astype(lora_adapters.get_path(abstract, path_).dtype)
    return jax.jit(one, out_shardings=replicated)

  def get_tensor(path_, layer):
    key = (path_, layer is not None)
    if key not in fns:
      fns[key] = tensor_fn(*key)
    out = fns[key](parts, np.int32(0 if layer is None else layer))
    if jax.process_index() != 0:
      out.block_until_ready()   # keep in step with the writer: one gathered tensor at a time
      return None
    return to_host(out)

  hf.save_hf_streamed(model_cfg, abstract, get_tensor, path, write=jax.process_index() == 0,
                      max_shard_bytes=max_shard_bytes)


def to_host(x) -> np.ndarray:
  """A replicated (or single-device) array -> host numpy: this device's full copy."""
  return np.asarray(x.addressable_data(0))
