"""jpost's DPO (sigmoid) and IPO losses from HF directories == an independent PyTorch computation.

The policy and the reference are two *different* tiny random transformers models saved to disk;
jpost loads them with `load_hf`, runs its fused log-prob forward and the registered losses; the
torch side computes full logits, log-softmax, gathers the completion tokens and applies the
ALGORITHMS.md formulas directly.
"""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from jpost import models  # noqa: E402
from jpost.losses import registry  # noqa: E402
from jpost.train import forward  # noqa: E402

VOCAB = 96


def _save_tiny_llama(path, seed):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=64, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path)
  return model


def _pairs(rng, n_pairs):
  """Prompt + chosen / rejected token ids with ragged lengths."""
  out = []
  for _ in range(n_pairs):
    prompt = rng.integers(1, VOCAB, rng.integers(2, 6)).tolist()
    chosen = rng.integers(1, VOCAB, rng.integers(1, 5)).tolist()
    rejected = rng.integers(1, VOCAB, rng.integers(1, 5)).tolist()
    out.append((prompt, chosen, rejected))
  return out


def _jpost_batch(pairs, T):
  """Interleaved rows (chosen 2p, rejected 2p+1) in the docs/architecture.md batch layout."""
  rows = [(p, c) for p, c, r in pairs for c in (c, r)]
  S = len(rows)
  b = {k: np.zeros((S, T), np.int32) for k in ("tokens", "targets", "positions", "segment_ids")}
  b["loss_mask"] = np.zeros((S, T), np.float32)
  b["seq_index"] = np.full((S, T), -1, np.int32)
  for i, (p, c) in enumerate(rows):
    seq = p + c
    n = len(seq)
    b["tokens"][i, :n] = seq
    b["targets"][i, :n - 1] = seq[1:]
    b["positions"][i, :n] = np.arange(n)
    b["segment_ids"][i, :n] = 1
    b["seq_index"][i, :n] = i
    b["loss_mask"][i, len(p) - 1:n - 1] = 1.0    # targets that are completion tokens
  b["example_valid"] = np.ones((S,), np.float32)
  return {k: jnp.asarray(v) for k, v in b.items()}


def _torch_seq_logps(model, pairs):
  out = []
  with torch.no_grad():
    for p, c, r in pairs:
      for comp in (c, r):
        ids = torch.tensor([p + comp])
        logits = model(ids).logits.double()[0]
        logp = torch.log_softmax(logits, -1)
        tgt = ids[0, len(p):]
        out.append(logp[len(p) - 1:-1].gather(-1, tgt[:, None]).sum().item())
  return np.array(out)


def test_dpo_and_ipo_match_torch(tmp_path):
  policy_t = _save_tiny_llama(tmp_path / "policy", seed=0)
  ref_t = _save_tiny_llama(tmp_path / "ref", seed=1)
  pairs = _pairs(np.random.default_rng(0), 5)
  pol = _torch_seq_logps(policy_t, pairs)
  ref = _torch_seq_logps(ref_t, pairs)
  lens = np.array([len(comp) for _, c, r in pairs for comp in (c, r)], np.float64)

  cfg, policy = models.load_hf(str(tmp_path / "policy"), dtype=jnp.float32)
  _, reference = models.load_hf(str(tmp_path / "ref"), dtype=jnp.float32)
  batch = _jpost_batch(pairs, T=16)
  spec = forward.ForwardSpec(model_cfg=dataclasses.replace(cfg, dtype="float32"), needs_ref=True,
                             impl="blockwise")
  logps = forward.compute_logps(spec, {"lm": policy}, {"lm": reference}, batch)

  beta = 0.1
  dw, dl = pol[0::2] - ref[0::2], pol[1::2] - ref[1::2]
  d = dw - dl
  sigmoid_expected = np.mean(np.logaddexp(0.0, -beta * d))          # -logsig(beta d)
  ipo_expected = np.mean((dw / lens[0::2] - dl / lens[1::2] - 1 / (2 * beta)) ** 2)

  for name, expected in (("sigmoid", sigmoid_expected), ("ipo", ipo_expected)):
    objective = registry.get_objective(name)
    loss_cfg = objective.default_config()
    loss_cfg.beta = beta
    loss, _ = objective.fn(logps, batch, loss_cfg)
    assert abs(float(loss) - expected) <= 1e-4, (name, float(loss), expected)
