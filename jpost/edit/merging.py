"""Task arithmetic and LiNeS (ALGORITHMS.md §7) as pure functions on param pytrees.

  tau = theta - theta_0                                task_vector(base, finetuned)
  theta = theta_0 + lam * tau                          task arithmetic: scale(tau, lam)
  theta = theta_0 + s(l) * tau_l,                      LiNeS: lines_scale(tau, axes, alpha, beta)
          s(l) = alpha + beta * l / (L - 1)
(theta = apply(theta_0, edited tau) in both cases.)

LiNeS ("LiNeS: Post-training layer scaling prevents forgetting and enhances model merging",
Wang et al.) scales the update of decoder block l (0-based, of L) linearly with depth: shallow
blocks stay near the pre-trained weights (general features), deep blocks keep the task update.
Parameters outside the blocks (embeddings, final norm, lm_head) get the shallowest scale, alpha.

A block here is one decoder layer. jpost stacks the layers of a param on a leading `layers`
logical axis (models.param_logical_axes: e.g. ('layers', 'embed', 'mlp')), so the per-block
scale is a [L] vector broadcast along that axis; a param without a `layers` axis is a non-block
param. The functions take that `axes` tree (same structure as the params, tuples of names) rather
than a ModelConfig, so they work on any pytree.

Single task: beta = 1 - alpha by default (the last block keeps the full fine-tuning update).

Multi-task (T task vectors tau_t merged into tau_merged by some merging method): LiNeS sets

    alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T

(the reference implementation, github.com/wang-kee/LiNeS src/eval/aggregation.py, uses L1 norms
of the flattened vectors), i.e. the shallowest blocks receive, in norm, the plain average of the
task vectors whatever the merging method; beta is tuned. For task arithmetic (tau_merged = the
sum) the ratio is 1 and alpha = 1/T; for the mean, alpha = 1. The ratio only departs from 1 / T
for merging methods that change the sum (TIES, consensus masks): `multitask_alpha` takes any
merged vector.
"""
import jax
import numpy as np

LAYER_AXIS = "layers"


# ------------------------------------------------------------------------------------ vectors

def _f32(x):
  return np.asarray(x, np.float32)


def task_vector(base, finetuned):
  """tau = finetuned - base, float32 leaves (the structures and shapes must match)."""
  check_same_structure(base, finetuned, "base", "fine-tuned")
  return jax.tree.map(lambda b, f: _f32(f) - _f32(b), base, finetuned)


def scale(tau, lam: float):
  """lam * tau."""
  return jax.tree.map(lambda t: np.float32(lam) * _f32(t), tau)


def apply(base, tau, dtype=None):
  """theta_0 + tau, each leaf cast to `dtype` (default: the base leaf's dtype)."""
  return jax.tree.map(lambda b, t: (_f32(b) + _f32(t)).astype(dtype or np.asarray(b).dtype),
                      base, tau)


def merge_task_vectors(taus, how: str = "sum"):
  """Task arithmetic's multi-task vector: sum_t tau_t ('sum') or their mean ('mean')."""
  total, n = None, 0
  for tau in taus:   # any iterable: a generator keeps one task vector in memory at a time
    total = jax.tree.map(_f32, tau) if total is None else jax.tree.map(np.add, total, tau)
    n += 1
  if n == 0:
    raise ValueError("merge_task_vectors: no task vectors")
  return _combine(total, n, how)


def _combine(total, n, how):
  if how not in ("sum", "mean"):
    raise ValueError(f"merge: how={how!r}, expected 'sum' or 'mean'")
  return scale(total, 1.0 / n) if how == "mean" else total


def l1_norm(tree) -> float:
  """||tree||_1 over every leaf (float64 accumulation: large models have billions of entries)."""
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree)))


def multitask_alpha(summed, merged, num_tasks: int) -> float:
  """LiNeS' alpha for T merged tasks: (||sum_t tau_t||_1 / ||tau_merged||_1) / T.

  summed: sum_t tau_t; merged: the merging method's multi-task vector (for task arithmetic the
  sum itself, giving 1/T)."""
  norm_merged = l1_norm(merged)
  if norm_merged == 0:
    raise ValueError("multitask_alpha: the merged task vector is zero (the fine-tuned models "
                     "equal the base)")
  return l1_norm(summed) / norm_merged / num_tasks


# --------------------------------------------------------------------------------- layer scaling

def layer_scales(num_layers: int, alpha: float, beta: float) -> np.ndarray:
  """s(l) = alpha + beta * l / (L - 1) for l = 0..L-1 -> [L] float32. One block: [alpha]."""
  if num_layers < 1:
    raise ValueError(f"layer_scales: num_layers={num_layers} must be >= 1")
  depth = np.arange(num_layers, dtype=np.float64) / max(num_layers - 1, 1)
  return (alpha + beta * depth).astype(np.float32)


def _is_axes(x):
  return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def num_blocks(tau, axes) -> int:
  """L: the size of the `layers` axis, the same for every param that has one."""
  sizes = set()
  for t, names in zip(jax.tree.leaves(tau), jax.tree.leaves(axes, is_leaf=_is_axes)):
    if LAYER_AXIS in names:
      sizes.add(np.shape(t)[names.index(LAYER_AXIS)])
  if len(sizes) != 1:
    raise ValueError(f"LiNeS needs one '{LAYER_AXIS}' axis size over the params, found "
                     f"{sorted(sizes) or 'none'}")
  return sizes.pop()


def lines_scale(tau, axes, alpha: float, beta: float):
  """LiNeS: each block's update scaled by s(l) (broadcast along its `layers` axis); params
  without a `layers` axis scaled by alpha. `axes`: the params' logical axis names
  (models.param_logical_axes(cfg)), or any tree of name tuples of the same structure."""
  axes_leaves = jax.tree.leaves(axes, is_leaf=_is_axes)
  leaves, treedef = jax.tree.flatten(tau)
  if len(axes_leaves) != len(leaves):
    raise ValueError(f"lines_scale: {len(leaves)} params but {len(axes_leaves)} axis-name "
                     "tuples: the axes tree does not describe these params")
  s = layer_scales(num_blocks(tau, axes), alpha, beta)
  out = []
  for t, names in zip(leaves, axes_leaves):
    t = _f32(t)
    if len(names) != t.ndim:
      raise ValueError(f"lines_scale: axis names {names} do not fit a param of shape {t.shape}")
    if LAYER_AXIS in names:
      shape = [1] * t.ndim
      shape[names.index(LAYER_AXIS)] = -1
      out.append(t * s.reshape(shape))
    else:
      out.append(np.float32(alpha) * t)
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------------------------ checks

def check_same_structure(a, b, name_a: str, name_b: str) -> None:
  """Same tree paths and leaf shapes, else ValueError naming the first difference."""
  pa = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(a)}
  pb = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(b)}
  only_a, only_b = sorted(set(pa) - set(pb)), sorted(set(pb) - set(pa))
  if only_a or only_b:
    raise ValueError(f"{name_a} and {name_b} have different params: only in {name_a}: "
                     f"{only_a[:3]}, only in {name_b}: {only_b[:3]}")
  for k in pa:
    if pa[k] != pb[k]:
      raise ValueError(f"param {k} has shape {pa[k]} in {name_a} but {pb[k]} in {name_b}")


# ---------------------------------------------------------------------------------- end to end

def merge(base, finetuned, axes, *, method: str = "task_arithmetic", how: str = "sum",
          lam: float = 1.0, alpha: float | None = None, beta: float | None = None,
          dtype=None):
  """theta_0 + edited task vector(s) -> (params, info).

  finetuned: an iterable of fine-tuned param trees (a generator that loads one at a time keeps
    memory at about four models: base, running sum, one fine-tuned model, its task vector).
  method 'task_arithmetic': theta_0 + lam * merge(tau_1..tau_T) (`how`: 'sum' | 'mean').
  method 'lines': theta_0 + lines_scale(merge(tau_1..tau_T), alpha, beta) with, by default,
    one task: alpha = 0.5, beta = 1 - alpha; T > 1 tasks: alpha = multitask_alpha, beta = 0.5
    (LiNeS tunes beta on held-out data).
  info: the method and the coefficients used (per-block scales for LiNeS), for the record.
  """
  total, n = None, 0
  for i, ft in enumerate(finetuned):
    check_same_structure(base, ft, "the base", f"fine-tuned model {i + 1}")
    tau = task_vector(base, ft)
    total = tau if total is None else jax.tree.map(np.add, total, tau)
    n += 1
  if n == 0:
    raise ValueError("merge: no fine-tuned models")
  merged = _combine(total, n, how)
  info = {"method": method, "num_tasks": n}
  if n > 1:
    info["merge"] = how
  if method == "task_arithmetic":
    edited = scale(merged, lam)
    info["lam"] = float(lam)
  elif method == "lines":
    if alpha is None:
      alpha = 0.5 if n == 1 else multitask_alpha(total, merged, n)
    if beta is None:
      beta = 1.0 - alpha if n == 1 else 0.5
    edited = lines_scale(merged, axes, alpha, beta)
    info.update(alpha=float(alpha), beta=float(beta),
                layer_scales=[round(float(x), 6)
                              for x in layer_scales(num_blocks(merged, axes), alpha, beta)])
  else:
    raise ValueError(f"merge: method={method!r}, expected 'task_arithmetic' or 'lines'")
  return apply(base, edited, dtype), info
