"""jpost/train/flops.py: the model-FLOP count behind MFU (train loop and benchmarks), against
hand counts and an independent count of the param tree."""
import dataclasses

import jax
import numpy as np
import pytest

from jpost import models
from jpost.train import flops
from jpost.train import forward
from jpost.train import loop as train_loop

import helpers

CFG = models.ModelConfig(vocab_size=100, d_model=8, num_layers=3, num_heads=4, num_kv_heads=2,
                         head_dim=4, mlp_dim=16)


def test_flop_count_equals_a_hand_count():
  cfg = CFG
  # Per layer: q 8*4*4 = 128, k = v = 8*2*4 = 64, o 128, MLP 3*8*16 = 384 -> 768; 3 layers
  # 2304, plus the 8 x 100 unembedding.
  assert flops.matmul_params(cfg) == 3104
  # One row of T = 10 tokens: matmuls 2 * 3104 * 10 = 62080; attention 4 * d_attn 16 * 3 layers
  # * 10^2 / 2 pairs = 9600.
  assert flops.forward_flops(cfg, 1, 10) == 62080 + 9600
  assert flops.train_flops(cfg, 2, 10) == 3 * 2 * (62080 + 9600)
  # The brief's convention for causal training attention: 12 * L * T^2 * d_attn / 2 per row.
  assert flops.train_flops(cfg, 1, 10) - 6 * 3104 * 10 == 12 * 3 * 10 ** 2 * 16 / 2
  # Prefill unembeds only the last position: 2 * (3104 - 800) * 10 + 2 * 800 + 9600 per row.
  assert flops.prefill_flops(cfg, 2, 10) == 2 * (46080 + 1600 + 9600)
  # Decode of N = 4 tokens after P = 10: 3 steps attending to 11, 12, 13 keys.
  assert flops.decode_flops(cfg, 1, 10, 4) == 3 * 2 * 3104 + 4 * 16 * 3 * (11 + 12 + 13)
  # Sliding windows: a layer of window W scores W * T - W^2 / 2 pairs once T > W.
  windowed = dataclasses.replace(cfg, sliding_window=4, sliding_window_pattern=2)  # layers 0, 2
  assert flops.attention_pairs(windowed, 10) == 2 * (4 * 10 - 8) + 50


@pytest.mark.parametrize("name", ["tiny", "qwen2_5_0_5b", "llama3_8b"])
def test_matmul_params_are_the_kernels_of_the_param_tree(name):
  """An independent count: every projection kernel, plus the unembedding (the tied embedding
  table, or the lm_head kernel, which is itself a kernel)."""
  cfg = models.get_model_config(name)
  shapes = models.param_shapes(cfg)
  kernels = sum(int(np.prod(s.shape)) for path, s in jax.tree_util.tree_leaves_with_path(shapes)
                if path[-1].key == "kernel")
  tied = cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0
  assert flops.matmul_params(cfg) == kernels + tied


def test_frozen_base_has_no_weight_gradient_flops():
  # Matmuls: forward + activation gradients = 4 * 3104 * 10; attention keeps its 3 x 9600.
  assert flops.train_flops(CFG, 2, 10, frozen_base=True) == 2 * (4 * 3104 * 10 + 3 * 9600)
  assert flops.train_flops(CFG, 2, 10, frozen_base=True) < flops.train_flops(CFG, 2, 10)


def test_per_token_count_adds_the_no_gradient_forwards():
  per_row = flops.train_flops(CFG, 1, 10) + 3 * flops.forward_flops(CFG, 1, 10)
  assert flops.train_flops_per_token(CFG, 10, extra_forwards=3) == per_row / 10


def test_peak_flops_matches_the_longest_device_name():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("TPU v5 lite") == 197e12      # not "TPU v5" (459e12)
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("cpu") is None


@pytest.mark.parametrize("objective,precompute,lora,extra", [
    ("nll", False, False, 0),
    ("sigmoid", False, False, 1),        # DPO: the reference forward in the step
    ("sigmoid", True, False, 0),         # ... unless its log-probs were precomputed
    ("kto", False, False, 3),            # reference + mismatched pairs (policy and reference)
    ("sft_kl", True, False, 1),          # token KL needs the reference's hidden states
    ("sigmoid", False, True, 1),         # LoRA: the base has no weight gradients
])
def test_the_loop_counts_the_forwards_its_step_runs(objective, precompute, lora, extra):
  from jpost.losses import registry
  obj = registry.get_objective(objective)
  cfg = helpers.load_config("sft")
  spec = forward.ForwardSpec(model_cfg=CFG, needs_ref=obj.needs_ref, needs_kl=obj.needs_kl,
                             needs_mismatch=obj.needs_mismatch, lora=object() if lora else None)
  seq = cfg.data.max_len
  want = flops.train_flops_per_token(CFG, seq, extra_forwards=extra, frozen_base=lora)
  assert train_loop.step_flops_per_token(cfg, spec, precompute) == want
