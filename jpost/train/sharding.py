"""The device mesh (`data`, `fsdp`, `tensor`) and the logical-axis -> mesh-axis rules.

Models name their axes logically ('embed', 'heads', 'batch', ...); one small table here decides
where each goes, so changing the parallelism never touches model code:

  data    pure data parallelism: params replicated, batch split
  fsdp    batch split *and* params / optimiser state split along 'embed' (ZeRO-3 style; XLA
          all-gathers each layer's weights when it runs)
  tensor  Megatron-style: heads, kv_heads, mlp and vocab split; the residual stream replicated

Usage:
  mesh = make_mesh(data=1, fsdp=-1, tensor=1)
  rules = default_rules()
  with axis_rules(rules, mesh):
    params = init_sharded(lambda k: models.init_params(cfg, k), mesh, rules,
                          models.param_logical_axes(cfg), key)
    h = jax.jit(models.apply, static_argnums=0)(cfg, params, tokens, positions, segment_ids)
"""
import contextlib
import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axes). A name absent here is replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
)


def default_rules(overrides=None) -> tuple:
  """The default table with entries replaced by `overrides` ({logical: mesh axes or None}).

  `overrides` may come straight from an ml_collections config (lists become tuples).
  """
  overrides = dict(overrides or {})
  rules = []
  for name, axes in DEFAULT_RULES:
    if name in overrides:
      axes = overrides.pop(name)
    rules.append((name, _canonical_axes(axes)))
  rules.extend((name, _canonical_axes(axes)) for name, axes in overrides.items())
  for name, axes in rules:
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rule {name!r} -> {axes!r}: unknown mesh axis {a!r} "
                         f"(mesh axes: {MESH_AXES})")
  return tuple(rules)


def _canonical_axes(axes):
  if isinstance(axes, (list, tuple)):
    return tuple(axes) if len(axes) != 1 else axes[0]
  return axes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over all devices of all processes; -1 = the rest.

  Axis types are Auto (GSPMD propagation), not the Explicit default of `jax.make_mesh`.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1")
  if any(v == 0 or v < -1 for v in sizes.values()):
    raise ValueError(f"mesh {sizes}: sizes must be positive (or -1 for the rest)")
  fixed = int(np.prod([v for v in sizes.values() if v != -1]))
  if free:
    if n % fixed:
      raise ValueError(f"mesh {sizes}: {n} devices are not divisible by "
                       f"{' x '.join(str(v) for v in sizes.values() if v != -1)} = {fixed}")
    sizes[free[0]] = n // fixed
  if int(np.prod(list(sizes.values()))) != n:
    raise ValueError(f"mesh data={sizes['data']} x fsdp={sizes['fsdp']} x "
                     f"tensor={sizes['tensor']} needs {int(np.prod(list(sizes.values())))} "
                     f"devices, but there are {n}")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    # Topology-aware order (e.g. tensor within a TPU host's ICI ring) when jax knows one.
    from jax.experimental import mesh_utils
    array = mesh_utils.create_device_mesh(shape, devices=devices,
                                          allow_split_physical_axes=True)
  except Exception:   # CPU / unknown topologies: process-major order
    array = np.asarray(devices).reshape(shape)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _is_axes_leaf(x):
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def logical_to_spec(names, rules) -> PartitionSpec:
  return nn.logical_to_mesh_axes(names, rules)


def logical_to_sharding(logical_axes, mesh: Mesh, rules, shapes=None):
  """Pytree of logical-name tuples -> pytree of NamedSharding.

  With `shapes` (same tree; arrays or ShapeDtypeStructs), a mesh axis that does not divide its
  dimension (e.g. one kv head over tensor=2) is dropped for that array, which is then replicated
  along it, instead of failing at placement.
  """
  def one(names, shape=None):
    spec = logical_to_spec(names, rules)
    if shape is not None:
      spec = _fit(spec, tuple(shape.shape), mesh, names)
    return NamedSharding(mesh, spec)

  if shapes is None:
    return jax.tree.map(one, logical_axes, is_leaf=_is_axes_leaf)
  return jax.tree.map(one, logical_axes, shapes, is_leaf=_is_axes_leaf)


def _fit(spec, shape, mesh, names):
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    group = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in group]))
    if dim % size:
      log.info("replicating %s dim of size %d: mesh axes %s (size %d) do not divide it",
               names, dim, axes, size)
      out.append(None)
    else:
      out.append(axes)
  return PartitionSpec(*out)


@contextlib.contextmanager
def axis_rules(rules, mesh: Mesh | None = None):
  """Logical axis rules (for the models' activation constraints) and, optionally, the mesh.

  Activation constraints need both: flax applies them only when a mesh is set with
  `jax.set_mesh` (the legacy `with mesh:` does not count), so pass the mesh here.
  """
  with contextlib.ExitStack() as stack:
    if mesh is not None:
      stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    yield


def init_sharded(init_fn, mesh: Mesh, rules, logical_axes, *args):
  """Runs `init_fn(*args)` under jit with every output created in its final sharding.

  `jax.eval_shape` gives the shapes without allocating, so no device ever holds the full params.
  """
  with axis_rules(rules, mesh):
    abstract = jax.eval_shape(init_fn, *args)
    shardings = logical_to_sharding(logical_axes, mesh, rules, shapes=abstract)
    return jax.jit(init_fn, out_shardings=shardings)(*args)
