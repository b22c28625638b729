"""The KV-cache decode path and the sampler: parity with the full forward pass and the trainer.

Tiny random models (float32) with params drawn on the host (no init compile); every sampling
config is compiled once and shared between tests where it can be (the sampler caches its jitted
functions), which keeps the file fast on a small CPU.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost import models
from jpost.ops import lm_head
from jpost.rl import sampler
from jpost.rl.sampler import SamplingConfig
from jpost.train import sharding

import helpers

TINY = models.get_model_config("tiny", dtype="float32")
# Everything the decode path must reproduce at once: alternating sliding windows (3 tokens, so
# they bite), attention and final soft-caps, qk-norm, MQA, Gemma's norms and embedding scale.
TINY_GEMMA_QK = dataclasses.replace(
    TINY, family="gemma2", activation="gelu_tanh", norm_plus_one=True, sandwich_norms=True,
    tie_embeddings=True, embed_scale=True, query_pre_attn_scalar=12, attn_softcap=5.0,
    final_softcap=4.0, sliding_window=3, sliding_window_pattern=2, qk_norm=True, num_kv_heads=1)
# Qwen2's q/k/v biases with a Mistral-style window on every layer, GQA, tied embeddings.
TINY_QWEN2_WINDOW = dataclasses.replace(TINY, family="qwen2", qkv_bias=True, sliding_window=4,
                                        tie_embeddings=True)

N = 6                                      # max_new_tokens
# Ragged, one padding row; 4 rows so that the sharded test (batch over data x fsdp = 4) reuses
# the unsharded compile of the other tests.
LENGTHS = np.array([5, 2, 7, 0], np.int32)
SAMPLING = SamplingConfig(max_new_tokens=N, temperature=0.7, top_p=0.9, top_k=5)


def _params(cfg, seed=0):
  return helpers.random_params(cfg, seed)


def _prompts(lengths, width=None, seed=1):
  """Left-padded [B, width] prompt tokens (ids >= 3, pad 0)."""
  width = width or int(lengths.max())
  rng = np.random.default_rng(seed)
  out = np.zeros((len(lengths), width), np.int32)
  for r, n in enumerate(lengths):
    out[r, width - n:] = rng.integers(3, TINY.vocab_size, n)
  return out


def _right_padded(prompt_BP, lengths, completions, width):
  """[prompt + completion] rows, right-padded to `width`: the trainer's layout."""
  b = len(lengths)
  tokens = np.zeros((b, width), np.int32)
  for r, n in enumerate(lengths):
    seq = np.r_[prompt_BP[r, prompt_BP.shape[1] - n:], completions[r]]
    tokens[r, :len(seq)] = seq
  real = np.zeros((b, width), bool)
  for r, n in enumerate(lengths):
    real[r, :n + len(completions[r])] = True
  positions = np.where(real, np.arange(width), 0).astype(np.int32)
  return tokens, positions, real.astype(np.int32)


def _greedy_reference(cfg, params, prompt_BP, lengths, steps):
  """Step-by-step arg-max of the full forward pass on the growing sequences (one shape).

  -> (tokens [B, steps], their log-probs [B, steps] under the last step's full forward)."""
  width = int(lengths.max()) + steps
  completions = [[] for _ in lengths]
  for _ in range(steps):
    tokens, positions, segments = _right_padded(prompt_BP, lengths, completions, width)
    z = np.asarray(models.logits(cfg, params, tokens, positions, segments), np.float64)
    for r, n in enumerate(lengths):
      completions[r].append(int(z[r, n + len(completions[r]) - 1].argmax()))
  logp = z - z.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  logps = [[logp[r, n - 1 + j, t] for j, t in enumerate(c)] for r, (n, c) in
           enumerate(zip(lengths, completions))]
  return np.asarray(completions, np.int32), np.asarray(logps)


def _trainer_logps(cfg, params, prompt_BP, lengths, completions, temperature):
  """What the trainer computes for the completions: logps [B, N] and soft-capped logits."""
  width = int(lengths.max()) + completions.shape[1]
  tokens, positions, segments = _right_padded(prompt_BP, lengths, completions, width)
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  mask = np.zeros_like(tokens)
  for r, n in enumerate(lengths):
    mask[r, n - 1:n - 1 + completions.shape[1]] = n > 0
  h = models.apply(cfg, params, tokens, positions, segments)
  logp, _ = lm_head.sequence_logprobs(h, models.unembedding(cfg, params), targets, mask,
                                      softcap=cfg.final_softcap, temperature=temperature)
  a = np.asarray(h) @ np.asarray(models.unembedding(cfg, params))
  if cfg.final_softcap:
    a = np.tanh(a / cfg.final_softcap) * cfg.final_softcap
  gather = lambda x: np.stack([x[r, max(n - 1, 0):max(n - 1, 0) + completions.shape[1]]
                               for r, n in enumerate(lengths)])
  return gather(np.asarray(logp)), gather(a)


# --- the decode path ---------------------------------------------------------------------------

# Llama (GQA, no window) is covered end to end by the greedy test below.
@pytest.mark.parametrize("cfg", [TINY_GEMMA_QK, TINY_QWEN2_WINDOW],
                         ids=["gemma2_window_softcap_qknorm_mqa", "qwen2_bias_window_gqa"])
def test_prefill_and_decode_steps_equal_apply(cfg):
  params = _params(cfg)
  lengths = np.array([6, 3, 0], np.int32)
  p, steps = 6, 5
  prompt = _prompts(lengths, p)
  rng = np.random.default_rng(2)
  tokens = np.concatenate([prompt, rng.integers(3, 512, (3, steps)).astype(np.int32)], 1)
  pad = p - lengths[:, None]
  slot = np.arange(p + steps)[None]
  positions = np.where(slot >= pad, slot - pad, 0).astype(np.int32)
  segments = (slot >= pad).astype(np.int32)
  h_full = np.asarray(models.apply(cfg, params, tokens, positions, segments))

  cache = models.init_cache(cfg, 3, p + steps)
  h, cache = models.prefill(cfg, params, tokens[:, :p], positions[:, :p], segments[:, :p], cache)
  hs = [np.asarray(h)]
  # One-token steps; for one config (a compile less) the last two tokens in one step:
  # decode_step takes any number of new tokens.
  widths = [1] * steps if cfg is not TINY_GEMMA_QK else [1] * (steps - 2) + [2]
  i = p
  for t in widths:
    h, cache = models.decode_step(cfg, params, tokens[:, i:i + t], positions[:, i:i + t], cache,
                                  i, segments[:, i:i + t])
    hs.append(np.asarray(h))
    i += t
  h_cached = np.concatenate(hs, 1)
  real = segments > 0
  np.testing.assert_allclose(h_cached[real], h_full[real], atol=1e-5, rtol=0)
  assert cache["k"].shape == (cfg.num_layers, 3, p + steps, cfg.num_kv_heads, cfg.head_dim)
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"]), segments)


def test_cache_is_sharded_over_batch_and_kv_heads():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  with sharding.axis_rules(sharding.default_rules(), mesh):
    cache = models.init_cache(TINY, 4, 8)
  spec = jax.sharding.PartitionSpec
  assert cache["k"].sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, spec(None, ("data", "fsdp"), None, "tensor")), 5)
  assert cache["segment_ids"].sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, spec(("data", "fsdp"))), 2)


# --- the sampler ---------------------------------------------------------------------------------

def test_greedy_equals_full_forward_argmax_with_eos_and_stop_sequence():
  params = _params(TINY)
  prompt = _prompts(LENGTHS)
  ref, ref_logps = _greedy_reference(TINY, params, prompt, LENGTHS, N)
  # EOS: row 0's third greedy token (not among its first two); stop sequence: row 1's tokens
  # 2..3 (two tokens). Rows whose reference contains neither must run to max_new_tokens.
  eos = int(ref[0, 2])
  assert eos not in ref[0, :2]
  stop = tuple(int(x) for x in ref[1, 2:4])
  sc = SamplingConfig(max_new_tokens=N, temperature=0, eos_ids=(eos,), stop_sequences=(stop,))
  out = sampler.generate(TINY, params, prompt, LENGTHS, jax.random.PRNGKey(0), sc)

  for r, n in enumerate(LENGTHS):
    if n == 0:
      assert out["lengths"][r] == 0 and out["stopped"][r] and not out["tokens"][r].any()
      continue
    seq = [int(x) for x in ref[r]]
    end, stopped = N, False
    for j in range(N):
      if seq[j] == eos or (j >= 1 and tuple(seq[j - 1:j + 1]) == stop):
        end, stopped = j + 1, True
        break
    assert (out["lengths"][r], out["stopped"][r]) == (end, stopped), r
    np.testing.assert_array_equal(out["tokens"][r, :end], ref[r, :end])
    assert not out["tokens"][r, end:].any() and not out["logps"][r, end:].any()
  assert out["lengths"][0] == 3 and out["stopped"][0]
  assert out["lengths"][1] <= 4 and out["stopped"][1]
  assert (~out["stopped"] & (out["lengths"] == N)).any(), "no row ran to max_new_tokens"
  # Greedy log-probs are temperature-1 log-probs of the chosen tokens.
  live = np.arange(N)[None] < out["lengths"][:, None]
  np.testing.assert_allclose(out["logps"][live], ref_logps[live], atol=1e-4, rtol=0)
  # Sampling from the top 1 token is greedy, whatever the key.
  top1 = sampler.generate(TINY, params, prompt, LENGTHS, jax.random.PRNGKey(5),
                          dataclasses.replace(sc, temperature=1.0, top_k=1))
  for k in out:
    np.testing.assert_allclose(top1[k], out[k], atol=1e-6, rtol=0)


def test_sampling_logps_equal_trainer_logps_and_tokens_respect_top_k_top_p():
  cfg = TINY_GEMMA_QK   # a final soft-cap: it must apply before the temperature, as in training
  params = _params(cfg)
  prompt = _prompts(LENGTHS)
  out = sampler.generate(cfg, params, prompt, LENGTHS, jax.random.PRNGKey(3), SAMPLING)
  assert (out["lengths"][LENGTHS > 0] == N).all()   # no EOS configured
  completions = out["tokens"]
  want, a = _trainer_logps(cfg, params, prompt, LENGTHS, completions, SAMPLING.temperature)
  real = LENGTHS > 0
  np.testing.assert_allclose(out["logps"][real], want[real], atol=1e-4, rtol=0)
  assert (out["logps"][real] < 0).all() and not out["logps"][~real].any()
  # Every sampled token is among the 5 largest logits and inside the 0.9 nucleus of those 5.
  z = a[real] / SAMPLING.temperature
  tok = completions[real]
  picked = np.take_along_axis(z, tok[..., None], -1)[..., 0]
  rank = (z > picked[..., None]).sum(-1)
  assert (rank < 5).all()
  top5 = -np.sort(-z, -1)[..., :5]
  p5 = np.exp(top5 - top5.max(-1, keepdims=True))
  p5 /= p5.sum(-1, keepdims=True)
  mass_before = np.take_along_axis(np.cumsum(p5, -1) - p5, rank[..., None], -1)[..., 0]
  assert (mass_before < SAMPLING.top_p).all()
  assert len(np.unique(tok)) > 3   # actually sampled, not arg-max


def test_same_rng_same_output():
  params = _params(TINY)
  prompt = _prompts(LENGTHS)
  run = lambda seed: sampler.generate(TINY, params, prompt, LENGTHS, jax.random.PRNGKey(seed),
                                      SAMPLING)
  a, b, c = run(0), run(0), run(1)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert (a["tokens"] != c["tokens"]).any()


def test_decode_phases_grow_the_cache_without_changing_the_samples():
  assert sampler.decode_phase_ends(1024, 4) == (256, 512, 768, 1024)
  assert sampler.decode_phase_ends(200, 4) == (67, 134, 200)   # phases of >= 64 tokens
  assert sampler.decode_phase_ends(130, 4) == (65, 130)
  assert sampler.decode_phase_ends(6, 4) == (6,)
  assert sampler.decode_phase_ends(1024, 1) == (1024,)
  params, prompt = _params(TINY_GEMMA_QK), _prompts(LENGTHS)
  run = lambda phases: sampler.generate(
      TINY_GEMMA_QK, params, prompt, LENGTHS, jax.random.PRNGKey(5),
      dataclasses.replace(SAMPLING, max_new_tokens=130, decode_phases=phases))
  one, four = run(1), run(4)
  assert (one["lengths"] > 65).any()    # generation crossed the phase boundary
  for k in ("tokens", "lengths", "stopped"):
    np.testing.assert_array_equal(four[k], one[k])
  # Attention over fewer (empty, masked) slots groups its float32 sums differently: a few ulps
  # (measured 3.7e-7 relative after 113 tokens; 1e-6 is 8 ulps at |logp| ~ 1).
  np.testing.assert_allclose(four["logps"], one["logps"], rtol=1e-6, atol=0)


def test_prompt_widths_within_a_bucket_do_not_recompile():
  params = _params(TINY)
  # A config no other test uses, so the first call must trace (the counter is not vacuous).
  sc = SamplingConfig(max_new_tokens=2, temperature=0, prompt_buckets=(4, 8))
  before = sampler._TRACES
  outs = []
  for lengths, width in (([3, 1], 3), ([3, 1], 4), ([3, 1], 7), ([4, 2], 4)):
    lengths = np.array(lengths, np.int32)
    # Wider arrays carry extra left padding; every prompt here fits bucket 4.
    outs.append(sampler.generate(TINY, params, _prompts(lengths, width), lengths,
                                 jax.random.PRNGKey(0), sc))
    assert sampler._TRACES - before == 1
  for o in outs[1:3]:
    np.testing.assert_array_equal(o["tokens"], outs[0]["tokens"])
  too_long = np.array([9, 1], np.int32)
  with pytest.raises(ValueError, match="largest prompt bucket 8"):
    sampler.generate(TINY, params, _prompts(too_long), too_long, jax.random.PRNGKey(0), sc)


def test_decode_gets_compute_dtype_weights_with_bit_identical_output(monkeypatch):
  # float32 masters, bfloat16 compute: the program must be handed bfloat16 matmul weights (XLA
  # would otherwise convert the float32 ones inside the decode loop on every step).
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  params = _params(cfg)
  cast = models.compute_weights(cfg, params)
  assert cast["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert cast["embed"]["embedding"].dtype == jnp.bfloat16
  assert cast["final_norm"]["scale"].dtype == jnp.float32     # norms read in float32: untouched
  calls = []
  real = sampler.jitted_generate

  def spy(*args):
    program = real(*args)

    def call(lm_params, *rest):
      calls.append((args, {x.dtype for x in jax.tree.leaves(lm_params)}))
      return program(lm_params, *rest)
    return call

  monkeypatch.setattr(sampler, "jitted_generate", spy)
  prompt, rng = _prompts(LENGTHS), jax.random.PRNGKey(3)
  got = sampler.generate(cfg, params, prompt, LENGTHS, rng, SAMPLING)
  monkeypatch.undo()
  (args, dtypes), = calls
  assert jnp.dtype(jnp.bfloat16) in dtypes
  # The same program on the float32 masters (the model casts at each matmul): equal bits.
  bucket = args[3]
  padded = np.zeros((len(LENGTHS), bucket), np.int32)
  padded[:, bucket - prompt.shape[1]:] = prompt
  want = real(*args)(params, padded, LENGTHS, rng)
  for k in got:
    np.testing.assert_array_equal(got[k], np.asarray(want[k]))


def test_sharded_equals_unsharded():
  params = _params(TINY)
  prompt, lengths = _prompts(LENGTHS), LENGTHS
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  rules = sharding.default_rules()
  placed = jax.device_put(params, sharding.logical_to_sharding(
      models.param_logical_axes(TINY), mesh, rules, shapes=params))
  rng = jax.random.PRNGKey(7)
  want = sampler.generate(TINY, params, prompt, lengths, rng, SAMPLING)
  got = sampler.generate(TINY, placed, prompt, lengths, rng, SAMPLING, mesh=mesh)
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_array_equal(got["lengths"], want["lengths"])
  np.testing.assert_array_equal(got["stopped"], want["stopped"])
  np.testing.assert_allclose(got["logps"], want["logps"], atol=1e-5, rtol=0)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="top_p"):
    SamplingConfig(max_new_tokens=4, top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    SamplingConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="lengths"):
    sampler.generate(TINY, {}, np.zeros((2, 3), np.int32), np.array([4, 1]),
                     jax.random.PRNGKey(0), SamplingConfig(max_new_tokens=1))
