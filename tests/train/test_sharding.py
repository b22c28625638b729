"""Mesh construction, logical -> mesh rules, and sharded models equal to unsharded ones.

Runs on the 8 fake CPU devices set up by tests/conftest.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jpost import models
from jpost.train import sharding

CFG = models.get_model_config("tiny", dtype="float32")


def test_make_mesh_sizes_and_errors():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(data=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert dict(sharding.make_mesh(data=-1, fsdp=1, tensor=4).shape) == {
      "data": 2, "fsdp": 1, "tensor": 4}
  with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
    sharding.make_mesh(data=3)
  with pytest.raises(ValueError, match="needs 4 devices, but there are 8"):
    sharding.make_mesh(data=2, fsdp=1, tensor=2)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_rules_map_logical_axes_and_accept_overrides():
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  rules = sharding.default_rules()
  axes = models.param_logical_axes(CFG)
  shardings = sharding.logical_to_sharding(axes, mesh, rules)
  assert shardings["layers"]["attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  assert shardings["layers"]["attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
  assert shardings["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
  assert shardings["embed"]["embedding"].spec == P("tensor", "fsdp")
  assert shardings["final_norm"]["scale"].spec == P(None)
  assert sharding.logical_to_spec(("batch", "length", "activation_embed"), rules) == \
      P(("data", "fsdp"), None, None)
  # Overrides, e.g. from a config: no tensor parallelism on the vocabulary.
  rules2 = sharding.default_rules({"vocab": None, "batch": ["data"]})
  assert sharding.logical_to_spec(("vocab", "embed"), rules2) == P(None, "fsdp")
  assert sharding.logical_to_spec(("batch",), rules2) == P("data")
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.default_rules({"mlp": "model"})
  # A dimension the mesh axes do not divide (one kv head over tensor=2) is replicated instead.
  mqa = models.get_model_config("tiny", num_kv_heads=1)
  fitted = sharding.logical_to_sharding(models.param_logical_axes(mqa), mesh, rules,
                                        shapes=models.param_shapes(mqa))
  assert fitted["layers"]["attn"]["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)


@pytest.fixture(scope="module")
def reference():
  params = models.init_params(CFG, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (4, 16)).astype(np.int32)
  positions = np.tile(np.arange(16, dtype=np.int32), (4, 1))
  segments = np.ones_like(tokens)
  segments[1, 9:] = 2                      # a packed row
  positions[1, 9:] = np.arange(7)
  z = np.asarray(models.logits(CFG, params, tokens, positions, segments))
  return params, (tokens, positions, segments), z


@pytest.mark.parametrize("mesh_shape", [dict(data=1, fsdp=4, tensor=2),
                                        dict(data=2, fsdp=2, tensor=2)])
def test_sharded_logits_equal_unsharded(mesh_shape, reference):
  params, batch, z_ref = reference
  mesh = sharding.make_mesh(**mesh_shape)
  rules = sharding.default_rules()
  shardings = sharding.logical_to_sharding(models.param_logical_axes(CFG), mesh, rules)
  sharded = jax.device_put(params, shardings)
  q = sharded["layers"]["attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (2, 64 // mesh.shape["fsdp"], 2, 16)
  data_sharding = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None))
  batch = [jax.device_put(x, data_sharding) for x in batch]
  with sharding.axis_rules(rules, mesh):
    z = models.logits(CFG, sharded, *batch)
  err = float(np.abs(np.asarray(z) - z_ref).max())
  print(f"sharded {mesh_shape}: max|logit diff| = {err:.2e}")
  assert err <= 1e-5


def test_activation_constraints_need_rules_and_mesh():
  """apply works with and without a mesh; constraints appear only with both rules and mesh."""
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  tokens = np.ones((4, 16), np.int32)
  fn = jax.jit(lambda p, t: models.apply(CFG, p, t, t, t))
  count = lambda: fn.lower(models.param_shapes(CFG), tokens).as_text().count(
      "sharding_constraint")
  assert count() == 0
  with sharding.axis_rules(sharding.default_rules()):
    assert count() == 0          # rules without a mesh: nothing to constrain to
  with sharding.axis_rules(sharding.default_rules(), mesh):
    # embedding gather, per layer (scanned once): q, k, v, attention out, mlp hidden, residual;
    # final hidden states.
    assert count() >= 6


def test_init_sharded_creates_params_in_place_with_the_unsharded_values(reference):
  params, _, _ = reference
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  rules = sharding.default_rules()
  sharded = sharding.init_sharded(lambda key: models.init_params(CFG, key), mesh, rules,
                                  models.param_logical_axes(CFG), jax.random.PRNGKey(0))
  q = sharded["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 16)
  # Partitionable threefry: the same values whatever the sharding.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), sharded, params)


def test_load_hf_places_params_in_their_shardings(reference, tmp_path):
  params, batch, z_ref = reference
  models.save_hf(CFG, params, str(tmp_path))
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  cfg, loaded = models.load_hf(str(tmp_path), dtype=jnp.float32, mesh=mesh)
  expected = sharding.logical_to_sharding(models.param_logical_axes(cfg), mesh,
                                          sharding.default_rules())
  jax.tree.map(lambda x, s: x.sharding == s or pytest.fail(f"{x.sharding} != {s}"),
               loaded, expected)
  up = loaded["layers"]["mlp"]["up_proj"]["kernel"]      # [L, D, F] -> (None, fsdp, tensor)
  assert {s.data.shape for s in up.addressable_shards} == {(2, 32, 64)}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, params)
