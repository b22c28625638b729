"""Task arithmetic and LiNeS on toy pytrees with a stacked `layers` axis, and on the tiny model."""
import jax
import numpy as np
import pytest

from jpost import models
from jpost.edit import merging

L = 4
AXES = {"embed": ("vocab", "embed"),
        "layers": {"w": ("layers", "embed", "mlp"), "norm": ("layers", "norm")},
        # a param whose layer axis is not the leading one still scales per block
        "odd": ("embed", "layers"),
        "final_norm": ("norm",)}


def _toy(seed):
  rng = np.random.default_rng(seed)
  return {"embed": rng.normal(size=(5, 3)).astype(np.float32),
          "layers": {"w": rng.normal(size=(L, 3, 2)).astype(np.float32),
                     "norm": rng.normal(size=(L, 3)).astype(np.float32)},
          "odd": rng.normal(size=(3, L)).astype(np.float32),
          "final_norm": rng.normal(size=(3,)).astype(np.float32)}


def _allclose(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_layer_scales_formula():
  np.testing.assert_allclose(merging.layer_scales(4, 0.2, 0.6), [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
  np.testing.assert_allclose(merging.layer_scales(1, 0.3, 0.7), [0.3])   # one block: the shallowest
  with pytest.raises(ValueError):
    merging.layer_scales(0, 0.5, 0.5)


def test_lines_scales_each_block_by_its_depth_and_the_rest_by_alpha():
  base, ft = _toy(0), _toy(1)
  tau = merging.task_vector(base, ft)
  alpha, beta = 0.3, 0.5
  out = merging.lines_scale(tau, AXES, alpha, beta)
  for l in range(L):
    s = alpha + beta * l / (L - 1)
    np.testing.assert_allclose(out["layers"]["w"][l], s * tau["layers"]["w"][l], rtol=1e-6)
    np.testing.assert_allclose(out["layers"]["norm"][l], s * tau["layers"]["norm"][l], rtol=1e-6)
    np.testing.assert_allclose(out["odd"][:, l], s * tau["odd"][:, l], rtol=1e-6)
  np.testing.assert_allclose(out["embed"], alpha * tau["embed"], rtol=1e-6)
  np.testing.assert_allclose(out["final_norm"], alpha * tau["final_norm"], rtol=1e-6)


def test_end_points_give_the_finetuned_and_the_base_models():
  base, ft = _toy(0), _toy(1)
  tau = merging.task_vector(base, ft)
  _allclose(merging.apply(base, merging.lines_scale(tau, AXES, 1.0, 0.0)), ft, atol=1e-6)
  _allclose(merging.apply(base, merging.lines_scale(tau, AXES, 0.0, 0.0)), base, atol=0)
  # The default single-task beta = 1 - alpha: the last block gets the full update.
  params, info = merging.merge(base, [ft], AXES, method="lines", alpha=0.25)
  assert info["beta"] == 0.75 and info["layer_scales"][-1] == 1.0
  np.testing.assert_allclose(params["layers"]["w"][-1], ft["layers"]["w"][-1], atol=1e-6)
  np.testing.assert_allclose(params["embed"], base["embed"] + 0.25 * tau["embed"], atol=1e-6)
  # Task arithmetic, lam = 1 / 0.
  _allclose(merging.merge(base, [ft], AXES)[0], ft, atol=1e-6)
  _allclose(merging.merge(base, [ft], AXES, lam=0.0)[0], base, atol=0)


def test_multitask_alpha_is_the_norm_ratio_over_the_task_count():
  base = _toy(0)
  fts = [_toy(1), _toy(2), _toy(3)]
  taus = [merging.task_vector(base, ft) for ft in fts]
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]).astype(np.float64)
  summed = merging.merge_task_vectors(taus, "sum")
  np.testing.assert_allclose(flat(summed), sum(flat(t) for t in taus), rtol=1e-6)
  # Task arithmetic's merged vector is the sum (alpha = 1/T) or the mean (alpha = 1).
  assert merging.multitask_alpha(summed, summed, 3) == pytest.approx(1 / 3)
  mean = merging.merge_task_vectors(taus, "mean")
  assert merging.multitask_alpha(summed, mean, 3) == pytest.approx(1.0)
  # A merging method that changes the sum (here: TIES-like, keeping entries where all tasks agree
  # in sign): alpha = (||sum||_1 / ||merged||_1) / T, computed directly.
  def ties_like(*ts):
    return np.sum(ts, axis=0) * np.all(np.sign(ts) == np.sign(ts[0]), axis=0)

  merged = jax.tree.map(ties_like, *taus)
  expected = np.abs(flat(summed)).sum() / np.abs(flat(merged)).sum() / 3
  assert merging.multitask_alpha(summed, merged, 3) == pytest.approx(expected, rel=1e-9)
  assert expected > 1 / 3

  # merge() with LiNeS on T tasks: alpha from the formula, beta defaults to 0.5.
  params, info = merging.merge(base, fts, AXES, method="lines", how="sum")
  assert info["alpha"] == pytest.approx(1 / 3) and info["beta"] == 0.5
  s = merging.layer_scales(L, 1 / 3, 0.5)
  np.testing.assert_allclose(params["layers"]["w"],
                             base["layers"]["w"] + s[:, None, None] * summed["layers"]["w"],
                             atol=1e-5)
  np.testing.assert_allclose(params["embed"], base["embed"] + summed["embed"] / 3, atol=1e-5)
  # Task arithmetic over T tasks with --merge=mean and lam.
  params, _ = merging.merge(base, iter(fts), AXES, how="mean", lam=0.5)
  _allclose(params, jax.tree.map(lambda b, m: b + 0.5 * m, base, mean), atol=1e-5)


def test_on_the_tiny_models_param_axes():
  cfg = models.get_model_config("tiny")
  base = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.PRNGKey(0)))
  ft = jax.tree.map(np.asarray, models.init_params(cfg, jax.random.PRNGKey(1)))
  axes = models.param_logical_axes(cfg)
  tau = merging.task_vector(base, ft)
  out = merging.lines_scale(tau, axes, 0.1, 0.9)
  assert merging.num_blocks(tau, axes) == cfg.num_layers == 2
  q, q_tau = out["layers"]["attn"]["q_proj"]["kernel"], tau["layers"]["attn"]["q_proj"]["kernel"]
  np.testing.assert_allclose(q[0], 0.1 * q_tau[0], rtol=1e-6)
  np.testing.assert_allclose(q[1], 1.0 * q_tau[1], rtol=1e-6)
  np.testing.assert_allclose(out["lm_head"]["kernel"], 0.1 * tau["lm_head"]["kernel"], rtol=1e-6)


def test_mismatched_params_are_named():
  base, ft = _toy(0), _toy(1)
  ft["layers"]["w"] = ft["layers"]["w"][:, :2]
  with pytest.raises(ValueError, match=r"\['layers'\]\['w'\] has shape"):
    merging.task_vector(base, ft)
  del ft["embed"]
  with pytest.raises(ValueError, match="only in base"):
    merging.task_vector(base, ft)
  with pytest.raises(ValueError, match="method="):
    merging.merge(base, [base], AXES, method="ties")
