"""jpost's decoder == transformers, family by family, on tiny random models (float32, eager).

Each case builds a random transformers model in a temp dir, loads it with `load_hf` and compares
logits (max |diff| <= 1e-4). Weights use a larger init than HF's default and perturbed norms and
biases, so that attention is peaked, soft-caps bite and norms are not identities; each case also
checks that switching the feature it covers off (in transformers) moves the logits far beyond the
tolerance, so a pass cannot come from a feature that has no effect at these sizes.
"""
import copy
import dataclasses
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jpost import models  # noqa: E402
from jpost.models import hf as jhf  # noqa: E402

TOL = 1e-4
ABLATED_MIN = 1e-2       # a switched-off feature must change logits by at least this much
VOCAB, T = 128, 12

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, initializer_range=0.15)


def _zero_biases(model):
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.zero_()


def _drop_qk_norm(model):
  for layer in model.model.layers:
    layer.self_attn.q_norm = torch.nn.Identity()
    layer.self_attn.k_norm = torch.nn.Identity()


# name -> (transformers config class, its kwargs, {feature: ablation}). An ablation (config
# overrides, or an in-place edit of a copy of the model) switches the feature off *in
# transformers*: it must move the logits by > ABLATED_MIN, so matching the unablated model
# within TOL proves jpost implements the feature (cheaper than ablating jpost: no recompiles).
CASES = {
    "llama_mqa_untied": (transformers.LlamaConfig,
                         dict(num_key_value_heads=1, tie_word_embeddings=False), {}),
    "llama3_rope_scaling_tied": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=16)),
        {"rope_scaling": dict(rope_scaling=None)}),
    "mistral_sliding_window": (transformers.MistralConfig,
                               dict(num_key_value_heads=2, sliding_window=4),
                               {"sliding_window": dict(sliding_window=None)}),
    "qwen2_qkv_bias_tied": (transformers.Qwen2Config,
                            dict(num_key_value_heads=2, tie_word_embeddings=True),
                            {"qkv_bias": _zero_biases}),
    "qwen3_qk_norm_head_dim": (transformers.Qwen3Config,
                               dict(num_key_value_heads=2, head_dim=12),
                               {"qk_norm": _drop_qk_norm}),
    "gemma2": (transformers.Gemma2Config,
               dict(num_key_value_heads=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=6,
                    attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
               {"sliding_window": dict(layer_types=["full_attention"] * 2),
                "global_layers": dict(layer_types=["sliding_attention"] * 2),
                "attn_softcap": dict(attn_logit_softcapping=None),
                "final_softcap": dict(final_logit_softcapping=None),
                "query_pre_attn_scalar": dict(query_pre_attn_scalar=8)}),
}


def _ablated(name, model, ablation):
  if callable(ablation):
    model = copy.deepcopy(model)
    ablation(model)
    return model
  cls, kw, _ = CASES[name]
  other = transformers.AutoModelForCausalLM.from_config(
      cls(**{**_COMMON, **kw, **ablation}), attn_implementation="eager").eval()
  other.load_state_dict(model.state_dict())
  return other


def _torch_logits(model, ids_BT):
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(ids_BT))).logits.float().numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Builds each case once per module: {name: (hf_dir, torch model, ids, reference logits)}."""
  cache = {}

  def get(name):
    if name not in cache:
      cls, kw, _ = CASES[name]
      torch.manual_seed(0)
      config = cls(**{**_COMMON, **kw})
      model = transformers.AutoModelForCausalLM.from_config(
          config, attn_implementation="eager").eval()
      with torch.no_grad():   # norms at their init (1 or 0) and zero biases would hide bugs
        for pname, p in model.named_parameters():
          if "norm" in pname or "bias" in pname:
            p.add_(0.1 * torch.randn_like(p))
      path = tmp_path_factory.mktemp(name)
      model.save_pretrained(path)
      ids = np.random.default_rng(0).integers(0, VOCAB, (2, T)).astype(np.int32)
      cache[name] = (str(path), model, ids, _torch_logits(model, ids))
    return cache[name]

  return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, built):
  path, model, ids, ref = built(name)
  cfg, params = models.load_hf(path, dtype=jnp.float32)
  assert cfg.family == CASES[name][0].model_type
  z = np.asarray(models.logits(cfg, params, ids))
  err = float(np.abs(z - ref).max())
  print(f"parity {name}: max|logit diff| = {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
  assert err <= TOL, (name, err)
  for feature, ablation in CASES[name][2].items():
    moved = float(np.abs(_torch_logits(_ablated(name, model, ablation), ids) - ref).max())
    assert moved > ABLATED_MIN, (name, feature, moved)


@pytest.mark.parametrize("name", ["llama3_rope_scaling_tied", "qwen2_qkv_bias_tied",
                                  "qwen3_qk_norm_head_dim", "gemma2", "mistral_sliding_window",
                                  "llama_mqa_untied"])
def test_save_hf_round_trip(name, built, tmp_path):
  """load_hf -> save_hf -> transformers.from_pretrained: identical tensors, same logits."""
  path, model, ids, _ = built(name)
  cfg, params = models.load_hf(path, dtype=jnp.float32)
  z = np.asarray(models.logits(cfg, params, ids))
  out = tmp_path / "export"
  models.save_hf(cfg, params, str(out))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      out, attn_implementation="eager").eval()
  theirs = model.state_dict()
  ours = reloaded.state_dict()
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    assert torch.equal(ours[key], value), key
  err = float(np.abs(_torch_logits(reloaded, ids) - z).max())
  print(f"round trip {name}: max|logit diff| = {err:.2e}")
  assert err <= TOL
  # And back: the exported directory describes the same jpost model.
  cfg2, _ = models.load_hf(str(out), config_only=True)
  assert dataclasses.replace(cfg2, name=cfg.name) == cfg


@pytest.mark.parametrize("name", ["llama3_rope_scaling_tied", "gemma2"])
def test_bfloat16_compute_matches_transformers_bfloat16(name, built):
  """bf16 params and compute: jpost is no further from transformers-in-bf16 than transformers'
  own bf16 run is from its float32 run (the format's noise floor at this model's scale)."""
  path, model, ids, ref32 = built(name)
  cfg, params = models.load_hf(path, dtype=jnp.bfloat16)
  assert cfg.dtype == "bfloat16"
  h = jax.eval_shape(functools.partial(models.apply, cfg), params, ids,
                     np.broadcast_to(np.arange(T), ids.shape), np.ones_like(ids))
  assert h.dtype == jnp.bfloat16
  z16 = np.asarray(models.logits(cfg, params, ids))
  ref16 = _torch_logits(copy.deepcopy(model).to(torch.bfloat16), ids)
  ours, floor = float(np.abs(z16 - ref16).max()), float(np.abs(ref16 - ref32).max())
  print(f"bf16 {name}: max|jpost - hf| = {ours:.3f}, max|hf bf16 - hf f32| = {floor:.3f}")
  assert ours <= floor


def test_bf16_and_sharded_checkpoints(built, tmp_path):
  """bfloat16 tensors are read exactly; index.json shards are followed."""
  _, model, _, _ = built("qwen2_qkv_bias_tied")
  model_bf16 = transformers.AutoModelForCausalLM.from_config(model.config).to(torch.bfloat16)
  model_bf16.load_state_dict(model.state_dict())
  model_bf16.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  cfg, params = models.load_hf(str(tmp_path), dtype=jnp.float32)
  sd = model_bf16.state_dict()
  want = sd["model.layers.1.self_attn.k_proj.weight"].float().numpy()
  got = np.asarray(params["layers"]["attn"]["k_proj"]["kernel"][1])   # [D, G, K]
  np.testing.assert_array_equal(got.transpose(1, 2, 0).reshape(want.shape), want)
  np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"]),
                                sd["model.embed_tokens.weight"].float().numpy())
  _, params16 = models.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  assert params16["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16


def _write_config(path, **changes):
  with open(path / "config.json") as f:
    hf = json.load(f)
  hf.update(changes)
  with open(path / "config.json", "w") as f:
    json.dump(hf, f)


def test_unsupported_configs_fail_clearly(built, tmp_path):
  path, model, _, _ = built("llama_mqa_untied")
  model.save_pretrained(tmp_path)
  _write_config(tmp_path, model_type="phi3")
  with pytest.raises(jhf.UnsupportedConfig, match=r"config\.json: model_type='phi3'"):
    models.load_hf(str(tmp_path))
  _write_config(tmp_path, model_type="llama", rope_parameters=None,
                rope_scaling={"rope_type": "yarn", "factor": 4.0})
  with pytest.raises(jhf.UnsupportedConfig, match=r"config\.json: rope_scaling.rope_type='yarn'"):
    models.load_hf(str(tmp_path))
  _write_config(tmp_path, rope_scaling=None, attention_bias=True)
  with pytest.raises(jhf.UnsupportedConfig, match=r"config\.json: attention_bias=true"):
    models.load_hf(str(tmp_path))
  _write_config(tmp_path, attention_bias=False, num_key_value_heads=2)
  with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model.layers.0.self_attn."
                                       r"k_proj.weight' has shape"):
    models.load_hf(str(tmp_path))


def test_save_hf_bfloat16_in_shards(built, tmp_path):
  """bf16 params are written as BF16 shards + index.json that transformers and load_hf read."""
  path, model, _, _ = built("gemma2")
  cfg, params = models.load_hf(path, dtype=jnp.bfloat16)
  models.save_hf(cfg, params, str(tmp_path), max_shard_bytes=4096)
  assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto")
  assert reloaded.dtype == torch.bfloat16
  theirs = reloaded.state_dict()
  for key, value in model.state_dict().items():
    assert torch.equal(theirs[key], value.to(torch.bfloat16)), key
  _, back = models.load_hf(str(tmp_path), dtype=jnp.bfloat16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32),
                                                          np.asarray(b, np.float32)), back, params)
