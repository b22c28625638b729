"""The decoder alone: packing, causality, attention paths, remat, scan compile time, configs."""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost import models

import helpers

TINY = models.get_model_config("tiny", dtype="float32")
# A Gemma-2-shaped toy: soft-caps (explicit attention path), alternating windows, extra norms.
TINY_GEMMA = dataclasses.replace(
    TINY, family="gemma2", activation="gelu_tanh", norm_plus_one=True, sandwich_norms=True,
    tie_embeddings=True, embed_scale=True, query_pre_attn_scalar=12, attn_softcap=5.0,
    final_softcap=4.0, sliding_window=3, sliding_window_pattern=2)


def _params(cfg, seed=0):
  return helpers.random_params(cfg, seed)


def _packed_batch(rng, len_a=5, len_b=7, t=16):
  """Row 0: segments A, B packed, then padding; row 1: A alone; row 2: B alone; row 3: row 0 with
  one segment id for A and B (so B sees A). One shape: one compile."""
  a = rng.integers(1, 512, len_a)
  b = rng.integers(1, 512, len_b)
  tokens, positions, segments = (np.zeros((4, t), np.int32) for _ in range(3))
  ab = slice(len_a, len_a + len_b)
  tokens[0, :len_a], tokens[0, ab] = a, b
  positions[0, :len_a], positions[0, ab] = np.arange(len_a), np.arange(len_b)
  segments[0, :len_a], segments[0, ab] = 1, 2
  for row, seq in ((1, a), (2, b)):
    tokens[row, :len(seq)] = seq
    positions[row, :len(seq)] = np.arange(len(seq))
    segments[row, :len(seq)] = 1
  tokens[3], positions[3], segments[3] = tokens[0], positions[0], segments[0] > 0
  return tokens, positions, segments


@pytest.mark.parametrize("cfg", [TINY, TINY_GEMMA], ids=["llama", "gemma2"])
def test_packed_row_equals_separate_segments(cfg):
  tokens, positions, segments = _packed_batch(np.random.default_rng(0))
  z = np.asarray(models.logits(cfg, _params(cfg), tokens, positions, segments))
  np.testing.assert_allclose(z[0, :5], z[1, :5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(z[0, 5:12], z[2, :7], atol=1e-5, rtol=0)
  # Not vacuous: B's logits change when it may attend to A.
  assert np.abs(z[3, 5:12] - z[2, :7]).max() > 1e-3


def test_future_tokens_do_not_change_the_past():
  # Checked on logits at the packing test's shape (one compile less). Equivalent to checking the
  # hidden states: logits = h @ W with W [64, 512] of full rank, so equal logits mean equal h.
  tokens, positions, segments = _packed_batch(np.random.default_rng(1))
  tokens[:, :] = np.random.default_rng(1).integers(1, 512, tokens.shape)
  positions[:] = np.arange(16)
  segments[:] = 1
  changed = tokens.copy()
  changed[:, 7] = (changed[:, 7] + 1) % 512
  params = _params(TINY)
  z = np.asarray(models.logits(TINY, params, tokens, positions, segments))
  z2 = np.asarray(models.logits(TINY, params, changed, positions, segments))
  np.testing.assert_array_equal(z[:, :7], z2[:, :7])
  assert np.abs(z[:, 7:] - z2[:, 7:]).max(axis=-1).min() > 0   # every later position moved
  h = jax.eval_shape(functools.partial(models.apply, TINY), params, tokens, positions, segments)
  assert h.shape == (4, 16, TINY.d_model) and h.dtype == jnp.float32


def test_sliding_window_and_explicit_attention_path_agree_with_reference():
  """jax.nn.dot_product_attention and the explicit XLA path give the same result, and a window of
  W equals a dense reference that masks keys W or more tokens back."""
  from jpost.models import attention
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 9, 4, 8)).astype(np.float32)
  k, v = (rng.normal(size=(2, 9, 2, 8)).astype(np.float32) for _ in range(2))
  seg = np.asarray([[1] * 4 + [2] * 5, [1] * 7 + [0] * 2])

  @jax.jit
  def both(q, k, v, seg):
    idx = jnp.broadcast_to(jnp.arange(9), seg.shape)
    mask = attention.make_mask(seg, seg, idx, idx, sliding_window=3, is_sliding=jnp.bool_(True))
    return (attention.attend(q, k, v, mask, scale=0.3),
            attention.attend(q, k, v, mask, scale=0.3, impl="xla"))

  fused, explicit = map(np.asarray, both(q, k, v, seg))
  np.testing.assert_allclose(fused, explicit, atol=1e-5, rtol=0)
  t_idx, s_idx = np.arange(9)[:, None], np.arange(9)[None, :]
  for b in range(2):      # dense numpy reference, one (row, head) at a time
    ok = (seg[b][:, None] == seg[b][None, :]) & (s_idx <= t_idx) & (t_idx - s_idx < 3)
    for h in range(4):
      scores = np.where(ok, q[b, :, h] @ k[b, :, h // 2].T * 0.3, -np.inf)
      p = np.exp(scores - scores.max(-1, keepdims=True))
      ref = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // 2]
      np.testing.assert_allclose(fused[b, :, h], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy,expected", [("none", None), ("full", "None"),
                                             ("dots", "DotsSaveable(only_if_no_batch_dims=False)"),
                                             ("dots_no_batch",
                                              "DotsSaveable(only_if_no_batch_dims=True)")])
def test_remat_policy_is_applied_to_the_scanned_layer(policy, expected):
  cfg = dataclasses.replace(TINY, remat=policy)
  tokens = np.ones((1, 4), np.int32)
  jaxpr = str(jax.make_jaxpr(lambda p: models.apply(cfg, p, tokens, tokens, tokens))(
      models.param_shapes(cfg)))
  policies = re.findall(r"policy=(\S+)", jaxpr)
  assert policies == ([] if expected is None else [expected])


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_policies_keep_values_and_gradients(policy):
  cfg = TINY
  params = _params(cfg)
  tokens = np.random.default_rng(3).integers(1, 512, (2, 8)).astype(np.int32)
  pos = np.broadcast_to(np.arange(8, dtype=np.int32), tokens.shape)
  seg = np.ones_like(tokens)

  def loss(p, c):
    return jnp.mean(jnp.square(models.apply(c, p, tokens, pos, seg)))

  base_val, base_grad = jax.value_and_grad(loss)(params, cfg)
  val, grad = jax.value_and_grad(loss)(params, dataclasses.replace(cfg, remat=policy))
  np.testing.assert_allclose(val, base_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(base_grad)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# Parameter counts of the released checkpoints (total_size in their safetensors index / bytes per
# parameter). Qwen3 0.6B / 1.7B store a copy of their tied embedding, so their totals are checked
# against the model cards' non-embedding counts (0.44B, 1.4B) instead.
PUBLISHED_PARAMS = {
    "llama3_2_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "mistral_7b": 7_241_732_096,
    "qwen2_5_0_5b": 494_032_768, "qwen2_5_7b": 7_615_616_512, "qwen3_8b": 8_190_735_360,
    "gemma2_2b": 2_614_341_888, "gemma2_9b": 9_241_705_984,
}
CARD_NON_EMBEDDING = {"qwen3_0_6b": 0.44e9, "qwen3_1_7b": 1.4e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS) + sorted(CARD_NON_EMBEDDING))
def test_named_configs_have_the_published_sizes(name, tmp_path):
  cfg = models.get_model_config(name)
  shapes = models.param_shapes(cfg)   # eval_shape: nothing allocated
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  if name in PUBLISHED_PARAMS:
    assert total == PUBLISHED_PARAMS[name]
  else:
    non_embedding = total - cfg.vocab_size * cfg.d_model
    assert abs(non_embedding / CARD_NON_EMBEDDING[name] - 1) < 0.01, non_embedding
  axes = models.param_logical_axes(cfg)
  assert jax.tree.structure(shapes) == jax.tree.structure(
      axes, is_leaf=lambda x: isinstance(x, tuple))
  jax.tree.map(lambda s, a: len(s.shape) == len(a) or pytest.fail(f"{a} vs {s.shape}"),
               shapes, axes, is_leaf=lambda x: isinstance(x, tuple))
  # The HF config written for it reads back as the same model.
  hf = models.config_to_hf(cfg)
  back = models.config_from_hf(hf, name, dtype=cfg.param_dtype)
  assert dataclasses.replace(back, name=name, dtype=cfg.dtype) == cfg
  models.write_model_config_json(cfg, str(tmp_path / "m.json"))
  assert models.read_model_config_json(str(tmp_path / "m.json")) == cfg


def test_unknown_config_name_suggests():
  with pytest.raises(ValueError, match="did you mean 'qwen3_8b'"):
    models.get_model_config("qwen3_8")
