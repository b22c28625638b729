"""token_logprobs / token_kl under `shard_map`: tokens split over the data axes, the vocabulary
split over `tensor` (DESIGN.md sections 3 and 7).

Why not leave it to GSPMD: the tiled implementations loop over token and vocabulary tiles with
dynamic slices, which GSPMD cannot partition; it all-gathers h over the data axes and w over
`tensor` (every device then computes every token's log-prob against the full vocabulary). Here
each device runs the chosen implementation (blockwise / pallas_*) on its own tokens and its own
vocabulary columns, and only per-token vectors cross devices.

Per token, with shards s of the vocabulary (each a slice of columns) and lse_s, H_s the
log-sum-exp and the entropy of the softmax restricted to shard s:
  lse = M + log sum_s exp(lse_s - M),  M = max_s lse_s                 (pmax, psum)
  z_y = sum_s (target logit if the label is in shard s, else 0)         (psum)
  H   = sum_s P_s (H_s - log P_s),     P_s = exp(lse_s - lse)           (psum; a mixture's entropy)
  KL(q || p) = sum_s Q_s (KL(q_s || p_s) + log Q_s - log P_s)           (psum; Q_s: reference mass)
A label outside the shard becomes -1 locally: it never matches a column (no target term) while
its token still counts every column of the shard in lse / H. The backward calls the
implementation's own lp_bwd / kl_bwd per shard with the *global* lse (and entropy), so
p_j = exp(z_j - lse) is the global softmax on the local columns: dw is exact locally (then summed
over the token axes in float32: a reduce-scatter over `fsdp`, which also splits w's D rows in
the parameters, and an all-reduce over `data`) and dh is the sum over vocabulary shards (psum,
float32). The custom VJP sits outside the two shard_maps (forward, backward), so nothing is
differentiated through collectives.

Vocabulary sizes that the vocabulary axes do not divide are not split (the parameter placement,
`train.sharding.logical_to_sharding`, replicates such a dimension too): those axes split the
tokens instead. Zero-padding w would not do: a padded column has logit 0, not -inf, and the
implementations have no column mask to pass.

`context_layout` reads the mesh set with `jax.set_mesh` (what `train.sharding.axis_rules`
does) and the flax logical-axis rules ('batch' -> token axes, 'vocab' -> vocabulary axes), so
the LM head (`jpost.ops.lm_head`) uses this path inside any sharded train step without a mesh
argument; with no mesh, or a mesh of one device, it returns None and the unsharded op runs.
"""
import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jpost.ops import logprobs


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where the op's operands live (hashable: a custom_vjp static argument).

  mesh: a `Mesh` or `AbstractMesh`; token_axes: mesh axes that split the N tokens (h rows,
  labels); vocab_axes: mesh axes that split the V columns of w; embed_axes: token axes along
  which dw comes back split over its D rows (FSDP: a reduce-scatter instead of an all-reduce,
  and dw already in the parameter's layout). Any may be empty; token and vocabulary axes must
  not share an axis.
  """
  mesh: Any
  token_axes: tuple = ()
  vocab_axes: tuple = ()
  embed_axes: tuple = ()

  def size(self, axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)


def _entry(axes):
  """Axes tuple -> one PartitionSpec entry."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _specs(layout):
  """PartitionSpecs of h, w, per-token vectors and dw."""
  tok, voc = _entry(layout.token_axes), _entry(layout.vocab_axes)
  return P(tok, None), P(None, voc), P(tok), P(_entry(layout.embed_axes), voc)


def _check(layout, n, d, v):
  for name in layout.token_axes + layout.vocab_axes + layout.embed_axes:
    if name not in layout.mesh.axis_names:
      raise ValueError(f"mesh axis {name!r} is not in the mesh {layout.mesh.axis_names}")
  if set(layout.token_axes) & set(layout.vocab_axes):
    raise ValueError(f"token axes {layout.token_axes} and vocabulary axes {layout.vocab_axes} "
                     "share a mesh axis")
  # dw is summed over the token axes; scattering it over an axis the tokens do not split would
  # add up identical copies.
  if not set(layout.embed_axes) <= set(layout.token_axes):
    raise ValueError(f"embed axes {layout.embed_axes} must be token axes {layout.token_axes}")
  if d % layout.size(layout.embed_axes):
    raise ValueError(f"hidden size {d} does not split over mesh axes {layout.embed_axes}")
  if n % layout.size(layout.token_axes):
    raise ValueError(f"{n} tokens do not split over mesh axes {layout.token_axes} "
                     f"(size {layout.size(layout.token_axes)})")
  if v % layout.size(layout.vocab_axes):
    raise ValueError(f"vocabulary {v} does not split over mesh axes {layout.vocab_axes} "
                     f"(size {layout.size(layout.vocab_axes)}); a padded column would count in "
                     "the softmax, so such a vocabulary is not sharded (see context_layout)")


# ------------------------------------------------------------------------ the layout in context

def _rule_axes(name, rules, mesh):
  """Mesh axes (of size > 1) that the logical rules give to logical axis `name`."""
  entry = nn.logical_to_mesh_axes((name,), rules)[0]
  axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def context_layout(n: int, d: int, v: int, impl: str = "auto") -> Layout | None:
  """The layout for n tokens, hidden size d and a V=v vocabulary under the active mesh and
  logical rules.

  None (run the unsharded op) without a mesh or rules, inside another shard_map, when no mesh
  axis of size > 1 is named by the 'batch' or 'vocab' rules, or for impl='reference' (the
  materialised-logits test oracle, left to GSPMD). Vocabulary axes that do not divide v split
  the tokens instead; token axes that do not divide n are left out (tokens replicated along
  them). Both are logged once per shape.
  """
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or mesh.manual_axes or not rules or n == 0:
    return None
  token_axes, vocab_axes = _rule_axes("batch", rules, mesh), _rule_axes("vocab", rules, mesh)
  if set(token_axes) & set(vocab_axes):
    raise ValueError(f"the logical rules put 'batch' on {token_axes} and 'vocab' on "
                     f"{vocab_axes}: the log-prob op cannot split tokens and vocabulary over the "
                     "same mesh axis")
  if not token_axes and not vocab_axes:
    return None
  if impl == "reference":
    logprobs.log_once(logging.INFO, ("sharded-reference",),
                       "jpost.ops: impl='reference' has no sharded form; GSPMD partitions it")
    return None
  if v % math.prod(mesh.shape[a] for a in vocab_axes):
    logprobs.log_once(logging.INFO, ("vocab-split", v, vocab_axes),
                       "jpost.ops: vocabulary %d does not split over %s; those axes split the "
                       "tokens instead", v, vocab_axes)
    token_axes, vocab_axes = token_axes + vocab_axes, ()
  kept = []
  for a in token_axes:
    if n % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
      kept.append(a)
  if len(kept) < len(token_axes):
    logprobs.log_once(logging.INFO, ("token-split", n, token_axes),
                       "jpost.ops: %d tokens do not split over %s; tokens split over %s only",
                       n, token_axes, tuple(kept))
  if not kept and not vocab_axes:
    return None
  embed_axes = tuple(a for a in _rule_axes("embed", rules, mesh) if a in kept)
  if d % math.prod(mesh.shape[a] for a in embed_axes):
    embed_axes = ()
  return Layout(mesh, tuple(kept), vocab_axes, embed_axes)


# ------------------------------------------------------------------------ per-shard pieces

def _local_labels(labels, v_local, vocab_axes):
  """Global label ids -> ids in this shard's columns; -1 (matches no column) elsewhere."""
  if not vocab_axes:
    return labels
  local = labels - lax.axis_index(vocab_axes) * v_local
  return jnp.where((local >= 0) & (local < v_local), local, -1)


def _global_lse(lse_s, axes):
  m = lax.pmax(lse_s, axes)
  return m + jnp.log(lax.psum(jnp.exp(lse_s - m), axes))


def _mixture(share_s, term_s, axes):
  """sum_s share_s * term_s; a shard with no mass adds exactly 0 (its term may be inf)."""
  return lax.psum(jnp.where(share_s > 0, share_s * term_s, 0.0), axes)


def _sum_f32(x, axes):
  """psum in float32, back in x's dtype (bf16 partial sums would round once per shard)."""
  if not axes:
    return x
  return lax.psum(x.astype(jnp.float32), axes).astype(x.dtype)


def _reduce_dw(dw, layout):
  """Per-shard dw [D, V_local] -> the sum over token shards (float32), split over embed_axes on
  D: a reduce-scatter there first, then the all-reduce over the other token axes on 1/fsdp of
  the data."""
  out = dw.astype(jnp.float32)
  if layout.embed_axes:
    out = lax.psum_scatter(out, layout.embed_axes, scatter_dimension=0, tiled=True)
  rest = tuple(a for a in layout.token_axes if a not in layout.embed_axes)
  if rest:
    out = lax.psum(out, rest)
  return out.astype(dw.dtype)


def _shard_map(fn, layout, in_specs, out_specs):
  # check_vma=False: the implementations' loops start their carries from fresh zeros, which the
  # varying-axes checker types as device-invariant; every output here is reduced (psum / pmax)
  # over the axes its out_spec leaves out, and the custom VJP means no shard_map transpose.
  return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _local_impl(kind, impl, spec, layout, h, w):
  """The implementation each shard runs, resolved (and for kernels probed) on the local shapes."""
  n, d = h.shape
  local_h = jax.ShapeDtypeStruct((n // layout.size(layout.token_axes), d), h.dtype)
  local_w = jax.ShapeDtypeStruct((d, w.shape[1] // layout.size(layout.vocab_axes)), w.dtype)
  impl, spec = logprobs.resolve_impl(impl, spec, kind, local_h, local_w)
  if impl == "reference":
    raise ValueError("impl='reference' has no sharded form; use 'blockwise' (or call "
                     "jpost.ops.token_logprobs without a layout)")
  return impl, spec


# ------------------------------------------------------------------------ log-probs

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lp(h, w, labels, layout, impl, spec):
  return _lp_fwd(h, w, labels, layout, impl, spec)[0]


def _lp_fwd(h, w, labels, layout, impl, spec):
  vocab_axes = layout.vocab_axes

  def shard(h, w, labels):
    local = _local_labels(labels, w.shape[1], vocab_axes)
    lse_s, zy_s, ent_s = logprobs.impl_module(impl).lp_fwd(h, w, local, spec)
    if not vocab_axes:
      return lse_s, zy_s, ent_s
    lse = _global_lse(lse_s, vocab_axes)
    ent = None
    if ent_s is not None:
      ent = _mixture(jnp.exp(lse_s - lse), ent_s + (lse - lse_s), vocab_axes)
    return lse, lax.psum(zy_s, vocab_axes), ent

  h_spec, w_spec, t_spec, _ = _specs(layout)
  out_specs = (t_spec, t_spec, t_spec if spec.with_entropy else None)
  lse, zy, ent = _shard_map(shard, layout, (h_spec, w_spec, t_spec), out_specs)(h, w, labels)
  valid = labels >= 0
  outs = (jnp.where(valid, zy - lse, 0.0),)
  if spec.with_entropy:
    outs += (jnp.where(valid, ent, 0.0),)
  return outs, (h, w, labels, lse, ent)


def _lp_bwd(layout, impl, spec, res, cts):
  h, w, labels, lse, ent = res
  valid = labels >= 0      # the global mask: a label outside a shard is not masked
  g_lp = jnp.where(valid, cts[0], 0.0)
  g_ent = jnp.where(valid, cts[1], 0.0) if spec.with_entropy else None

  def shard(h, w, labels, lse, ent, g_lp, g_ent):
    local = _local_labels(labels, w.shape[1], layout.vocab_axes)
    dh, dw = logprobs.impl_module(impl).lp_bwd(h, w, local, lse, ent, g_lp, g_ent, spec)
    return _sum_f32(dh, layout.vocab_axes), _reduce_dw(dw, layout)

  h_spec, w_spec, t_spec, dw_spec = _specs(layout)
  e_spec = t_spec if spec.with_entropy else None
  dh, dw = _shard_map(shard, layout, (h_spec, w_spec, t_spec, t_spec, e_spec, t_spec, e_spec),
                      (h_spec, dw_spec))(h, w, labels, lse, ent, g_lp, g_ent)
  return dh, dw, None


_lp.defvjp(_lp_fwd, _lp_bwd)


# ------------------------------------------------------------------------ KL(ref || policy)

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _kl(h, w, h_ref, w_ref, labels, layout, impl, spec):
  return _kl_fwd(h, w, h_ref, w_ref, labels, layout, impl, spec)[0]


def _kl_fwd(h, w, h_ref, w_ref, labels, layout, impl, spec):
  vocab_axes = layout.vocab_axes

  def shard(h, w, h_ref, w_ref, labels):
    kl_s, lse_s, lse_ref_s = logprobs.impl_module(impl).kl_fwd(h, w, h_ref, w_ref, labels, spec)
    if not vocab_axes:
      return kl_s, lse_s, lse_ref_s
    lse, lse_ref = _global_lse(lse_s, vocab_axes), _global_lse(lse_ref_s, vocab_axes)
    log_q, log_p = lse_ref_s - lse_ref, lse_s - lse
    return _mixture(jnp.exp(log_q), kl_s + log_q - log_p, vocab_axes), lse, lse_ref

  h_spec, w_spec, t_spec, _ = _specs(layout)
  kl, lse, lse_ref = _shard_map(shard, layout, (h_spec, w_spec, h_spec, w_spec, t_spec),
                                (t_spec,) * 3)(h, w, h_ref, w_ref, labels)
  return jnp.where(labels >= 0, kl, 0.0), (h, w, h_ref, w_ref, labels, lse, lse_ref)


def _kl_bwd(layout, impl, spec, res, g):
  h, w, h_ref, w_ref, labels, lse, lse_ref = res
  g = jnp.where(labels >= 0, g, 0.0)

  def shard(h, w, h_ref, w_ref, labels, lse, lse_ref, g):
    dh, dw = logprobs.impl_module(impl).kl_bwd(h, w, h_ref, w_ref, labels, lse, lse_ref, g, spec)
    return _sum_f32(dh, layout.vocab_axes), _reduce_dw(dw, layout)

  h_spec, w_spec, t_spec, dw_spec = _specs(layout)
  dh, dw = _shard_map(shard, layout, (h_spec, w_spec, h_spec, w_spec) + (t_spec,) * 4,
                      (h_spec, dw_spec))(h, w, h_ref, w_ref, labels, lse, lse_ref, g)
  return dh, dw, None, None, None


_kl.defvjp(_kl_fwd, _kl_bwd)


# ------------------------------------------------------------------------ public entry points

def token_logprobs(h, w, labels, layout: Layout, *, temperature=1.0, softcap=None,
                   with_entropy=False, impl="auto", block_sizes=None):
  """`jpost.ops.token_logprobs` with h / labels split over `layout.token_axes` and w's columns
  over `layout.vocab_axes`; the same outputs (float32, 0 where label < 0) and gradients.

  Raises ValueError when the axes do not divide N / V (see `context_layout` for the choice that
  avoids that) and for impl='reference'.
  """
  h, w, labels = logprobs.prepare_operands(h, w, labels)
  _check(layout, *h.shape, w.shape[1])
  spec = logprobs.make_spec(temperature, softcap, with_entropy, block_sizes)
  impl, spec = _local_impl("lp", impl, spec, layout, h, w)
  outs = _lp(h, w, labels, layout, impl, spec)
  return outs[0], (outs[1] if spec.with_entropy else None)


def token_kl(h, w, h_ref, w_ref, labels, layout: Layout, *, temperature=1.0, softcap=None,
             impl="auto", block_sizes=None):
  """`jpost.ops.token_kl` (full-vocabulary KL(p_ref || p_theta) [N]) under `layout`."""
  h, w, labels = logprobs.prepare_operands(h, w, labels)
  h_ref, w_ref, _ = logprobs.prepare_operands(h_ref, w_ref, labels)
  if h_ref.shape != h.shape or w_ref.shape != w.shape:
    raise ValueError(f"reference shapes {h_ref.shape}, {w_ref.shape} differ from {h.shape}, "
                     f"{w.shape}")
  h_ref, w_ref = h_ref.astype(h.dtype), w_ref.astype(h.dtype)
  _check(layout, *h.shape, w.shape[1])
  spec = logprobs.make_spec(temperature, softcap, False, block_sizes)
  impl, spec = _local_impl("kl", impl, spec, layout, h, w)
  return _kl(h, w, lax.stop_gradient(h_ref), lax.stop_gradient(w_ref), labels, layout, impl,
             spec)
