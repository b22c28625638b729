"""A whole model loss + gradient through the fused helper never allocates [B, T, V] logits.

Measured from the compiled executable's memory analysis (temporary buffers), for a tiny decoder
with a large vocabulary so the logits would dominate: the `reference` implementation (which does
materialise logits) is shown above B*T*V*4 bytes, proving the measurement sees them.
"""
import dataclasses

import jax
import numpy as np

from jpost import models
from jpost.losses import registry
from jpost.train import forward

B, T, V = 8, 64, 32768


def _temp_bytes(impl):
  cfg = models.get_model_config("tiny", vocab_size=V)
  cfg = dataclasses.replace(cfg, dtype="float32")
  params = {"lm": jax.eval_shape(lambda: models.init_params(cfg, jax.random.PRNGKey(0)))}
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, V, (B, T)).astype(np.int32)
  batch = {
      "tokens": tokens, "targets": np.roll(tokens, -1, 1),
      "loss_mask": np.ones((B, T), np.float32), "positions": np.tile(np.arange(T), (B, 1)),
      "segment_ids": np.ones((B, T), np.int32),
      "seq_index": np.tile(np.arange(B)[:, None], (1, T)).astype(np.int32),
      "example_valid": np.ones((B,), np.float32)}
  objective = registry.get_objective("nll")
  spec = forward.ForwardSpec(model_cfg=cfg, impl=impl)

  def loss(p):
    return objective.fn(forward.compute_logps(spec, p, None, batch), batch,
                        objective.default_config())[0]

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_model_loss_and_grad_allocate_no_logits():
  logits_bytes = B * T * V * 4
  fused = _temp_bytes("blockwise")
  naive = _temp_bytes("reference")
  print(f"temp bytes: blockwise {fused:,} ({100 * fused / logits_bytes:.1f}% of logits), "
        f"reference {naive:,} ({100 * naive / logits_bytes:.0f}%)")
  assert naive > logits_bytes
  # What remains is the model's own activations and one [tokens, vocab block] tile.
  assert fused < 0.25 * logits_bytes
