"""End-of-run HF export (jpost/train/export.py): streamed tensor by tensor from sharded params,
to a local or a gs:// directory (an in-process fake GCS), the same bytes as `models.save_hf`.

The two-process export (each process holding only its shards) is checked against the
one-process export in tests/train/test_multiprocess.py (the resumed two-process run exports).
"""
import filecmp
import os
import weakref

import jax
import numpy as np
import pytest

from jpost import models
from jpost.adapters import lora
from jpost.models import hf
from jpost.train import export as texport
from jpost.train import sharding

import helpers

CFG = models.get_model_config("tiny")
# tiny: 558 KB of float32 params, the largest tensors (embedding, head) 128 KiB each: four
# shards, each tensor in one.
SHARD = 200_000


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  with helpers.fake_gcs(tmp_path / "gcs", monkeypatch) as fs:
    yield fs


def _mesh_params(params, axes, shapes):
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  shardings = sharding.logical_to_sharding(axes, mesh, sharding.default_rules(), shapes=shapes)
  return jax.device_put(params, shardings), mesh


def _sharded_lm(seed=0):
  host = helpers.random_params(CFG, seed)
  params, _ = _mesh_params({"lm": host}, {"lm": models.param_logical_axes(CFG)},
                           {"lm": models.param_shapes(CFG)})
  return host, params


def _same_files(got, want):
  names = sorted(os.listdir(want))
  assert sorted(os.listdir(got)) == names
  for n in names:
    assert filecmp.cmp(os.path.join(got, n), os.path.join(want, n), shallow=False), n
  return names


def test_streamed_export_to_gs_equals_local_save_hf(tmp_path, fake_gcs):
  host, params = _sharded_lm()
  assert not params["lm"]["embed"]["embedding"].sharding.is_fully_replicated
  local = str(tmp_path / "local")
  models.save_hf(CFG, host, local, max_shard_bytes=SHARD)
  texport.save_hf(params, None, CFG, "gs://bucket/runs/hf", max_shard_bytes=SHARD)
  on_gcs = os.path.join(fake_gcs.root, "bucket/runs/hf")
  names = _same_files(on_gcs, local)
  assert "model.safetensors.index.json" in names and "model-00004-of-00004.safetensors" in names
  assert fake_gcs.renamed == []   # objects written whole (a local temp file, then one upload)
  _, loaded = models.load_hf(on_gcs)
  jax.tree.map(np.testing.assert_array_equal, loaded, host)
  # The local destination of the same stream: same bytes, no temporary file left behind.
  texport.save_hf(params, None, CFG, str(tmp_path / "streamed"), max_shard_bytes=SHARD)
  _same_files(str(tmp_path / "streamed"), local)


def test_streamed_export_holds_one_tensor_at_a_time(tmp_path, monkeypatch):
  """Every gathered tensor reaches the host once, and is dropped (written) before the next one
  is gathered: the host never holds more than one tensor's bytes, less than one shard."""
  _, params = _sharded_lm()
  live, peak, gathered = {}, [0], []
  to_host = texport.to_host

  def counting(x):
    out = to_host(x)
    live[id(out)] = out.nbytes
    weakref.finalize(out, live.pop, id(out))
    peak[0] = max(peak[0], sum(live.values()))
    gathered.append(out.nbytes)
    return out

  monkeypatch.setattr(texport, "to_host", counting)
  texport.save_hf(params, None, CFG, str(tmp_path / "hf"), max_shard_bytes=SHARD)
  shards = hf.hf_shards(CFG, models.param_shapes(CFG), SHARD)
  model_bytes = sum(hf.shard_bytes(s) for s in shards)
  largest_tensor = max(hf.shard_bytes({n: e}) for s in shards for n, e in s.items())
  print(f"peak host bytes of gathered tensors {peak[0]}, shard limit {SHARD}, "
        f"model {model_bytes}, {len(gathered)} gathers")
  assert len(gathered) == sum(len(s) for s in shards)    # each HF tensor gathered once
  assert sum(gathered) == model_bytes
  assert model_bytes > 2 * SHARD and len(shards) == 4
  assert peak[0] == largest_tensor <= SHARD
  assert not live


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_streamed_lora_export_merges_per_layer(tmp_path, quantize):
  """A LoRA (QLoRA) run's params, sharded: the per-layer merge on the devices writes what the
  whole-tree host merge (`lora.export_lm` + `save_hf`) writes."""
  section = dict(lora.default_config(), rank=4, alpha=8.0, quantize=quantize)
  spec = lora.spec_from_config(section, CFG.param_dtype)
  host = helpers.random_params(CFG)
  lm, mesh = _mesh_params({"lm": host}, {"lm": models.param_logical_axes(CFG)},
                          {"lm": models.param_shapes(CFG)})
  params, _, shardings = lora.add_adapters(lm, {"lm": models.param_logical_axes(CFG)}, spec, CFG,
                                           mesh, sharding.default_rules(), jax.random.PRNGKey(1))
  rng = np.random.default_rng(2)   # non-zero B, so the merge changes every target
  adapters = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype) * 0.1,
                          jax.device_get(params["lora"]))
  params = dict(params, lora=jax.device_put(adapters, shardings["lora"]))

  texport.save_hf(params, section, CFG, str(tmp_path / "streamed"), max_shard_bytes=SHARD)
  want = jax.device_get(lora.export_lm(jax.device_get(params), section, CFG))
  _, got = models.load_hf(str(tmp_path / "streamed"))
  diff = max(jax.tree.leaves(jax.tree.map(lambda g, w: float(np.abs(g - w).max()), got, want)))
  print(f"max |streamed - host merge| {diff:.2e}")   # measured: 0 (none), 6e-8 (nf4)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), got, want)
  q = lambda p: p["layers"]["attn"]["q_proj"]["kernel"]
  assert np.abs(q(got) - q(host)).max() > 1e-3   # the adapters are in
