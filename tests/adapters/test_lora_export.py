"""LoRA exports (scripts/export_hf.py): merged HF weights and PEFT adapters both load in
transformers (+ peft) and give the jpost adapter forward's logits; a QLoRA DPO run through the
training loop (slow).

Tolerance 1e-4 on logits, float32 on both sides: the same bound as the decoder's HF parity tests
(tests/models/test_hf_parity.py); the LoRA path adds two small matmuls per projection, whose
float32 summation order differs between XLA and torch.
"""
import importlib
import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from jpost import models
from jpost.adapters import lora
from jpost.adapters import peft as jpeft
from jpost.checkpoints import train_ckpt
from jpost.train import loop

from helpers import random_params

import helpers

# The test extra installs these; a missing one must fail, not skip the PEFT check.
import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

TOL = 1e-4


SPEC = lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, quantize="nf4",
                     adapter_dtype="bfloat16")


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.as_tensor(ids)).logits.float().numpy()


def _fake_run(workdir, model_cfg, params, spec):
  """A workdir as a LoRA run leaves it (model_config.json, config.json, one checkpoint)."""
  os.makedirs(workdir)
  models.write_model_config_json(model_cfg, os.path.join(workdir, "model_config.json"))
  section = dict(lora.default_config(), rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
                 quantize=spec.quantize, targets=",".join(spec.targets),
                 adapter_dtype=spec.adapter_dtype)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"lora": section, "model": {"init": "random"}}, f)
  ckpt = train_ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params}, {}, {})
  ckpt.close()


def _check_peft_dir(out, ids, z_base, z_jpost, model_cfg, want_spec, want_adapters) -> dict:
  """A PEFT export of a quantised random-init run: its config, the dequantised base written
  beside it (no HF base to point at), transformers + peft logits equal to jpost's, and a
  read-back into the same adapters. Returns adapter_config.json."""
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == (
      "LORA", want_spec.rank, want_spec.alpha)
  assert config["base_model_name_or_path"] == os.path.join(out, "base")
  base = transformers.AutoModelForCausalLM.from_pretrained(
      config["base_model_name_or_path"], attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(base, ids), z_base, atol=TOL, rtol=0)
  adapted = peft.PeftModel.from_pretrained(base, out).eval()
  np.testing.assert_allclose(_torch_logits(adapted, ids), z_jpost, atol=TOL, rtol=0)
  spec2, adapters2 = jpeft.load(out, model_cfg)
  assert spec2 == want_spec
  jax.tree.map(np.testing.assert_array_equal, adapters2, want_adapters)
  return config


def _export(monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", ["export_hf.py", *argv])
  helpers.load_script("export_hf").main()


def test_export_script_writes_merged_and_peft_adapters_that_transformers_loads(
    tmp_path, monkeypatch):
  model_cfg = models.get_model_config("tiny")
  lm = jax.jit(lora.quantize_base, static_argnums=(1, 2))(random_params(model_cfg), SPEC,
                                                           model_cfg)
  rng = np.random.default_rng(3)
  adapters = jax.tree.map(     # as after training: B != 0
      lambda x: (np.asarray(x, np.float32) + 0.05 * rng.normal(size=x.shape)).astype(x.dtype),
      jax.jit(lora.init_adapters, static_argnums=(0, 1))(SPEC, model_cfg, jax.random.PRNGKey(1)))
  params = jax.device_get({"lm": lm, "lora": adapters})
  workdir = str(tmp_path / "run")
  _fake_run(workdir, model_cfg, params, SPEC)
  ids = np.random.default_rng(0).integers(1, model_cfg.vocab_size, (2, 12)).astype(np.int32)
  z_jpost = np.asarray(models.logits(model_cfg, lora.attach(lm, adapters, SPEC), ids))
  z_base = np.asarray(models.logits(model_cfg, lm, ids))
  assert np.abs(z_jpost - z_base).max() > 1e-2           # the adapters matter

  # The scripts that load a model by path (sample.py, score.py, merge.py) get the adapters
  # merged in, not the bare base.
  from jpost.models import resolve
  resolved_cfg, resolved = resolve.load(resolve.resolve(workdir))
  assert "lora" not in resolved
  # 1e-5 of the logits' scale: merged weights round W + dW before the matmul, the adapter
  # forward x W + (x A) B (measured 1.0e-5 absolute at max |logit| ~ 3).
  z_resolved = np.asarray(models.logits(resolved_cfg, resolved["lm"], ids))
  assert np.abs(z_resolved - z_jpost).max() <= 1e-5 * np.abs(z_jpost).max()

  _export(monkeypatch, workdir, str(tmp_path / "merged"))            # --adapters=merged
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / "merged"), attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(merged, ids), z_jpost, atol=TOL, rtol=0)

  out = str(tmp_path / "adapter")
  _export(monkeypatch, workdir, out, "--adapters=peft")
  config = _check_peft_dir(out, ids, z_base, z_jpost, model_cfg,
                           lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1), params["lora"])
  assert config["task_type"] == "CAUSAL_LM"
  assert config["target_modules"] == list(lora.TARGETS)
  with pytest.raises(SystemExit):      # argparse error: a plain run has no adapters to export
    plain = str(tmp_path / "plain")
    _fake_run(plain, model_cfg, {"lm": jax.device_get(lora.dequantized_base(lm, model_cfg))},
              SPEC)
    _export(monkeypatch, plain, str(tmp_path / "x"), "--adapters=peft")


def _config(workdir):
  sys.path.insert(0, os.path.join(helpers.ROOT, "configs"))
  try:
    c = importlib.import_module("dpo").get_config()
  finally:
    sys.path.pop(0)
  c.train.update(steps=2, batch_size=8, log_every=1)
  c.warm_start.sft_steps = 0
  c.optim.update(lr=5e-2, warmup_steps=0)      # big steps: the adapters must matter below
  c.eval.update(every_steps=0, batch_size=8, max_batches=1)
  c.checkpoint.update(every_steps=2, async_save=False)
  c.log.tensorboard = False
  c.data.max_len = 24
  c.lora.update(rank=4, alpha=8.0, dropout=0.1, quantize="nf4", targets="all-linear")
  c.ref.precompute = True                   # the reference pass reads the quantised base
  c.export.hf_dir = os.path.join(workdir, "merged")
  return c


@pytest.mark.slow
def test_qlora_dpo_run_through_the_loop_exports_peft_adapters(tmp_path, monkeypatch):
  """loop.run with QLoRA (NF4 base, dropout, ref.precompute): the reference is the quantised
  base, the end-of-run export is merged, the PEFT export matches. Slow: a whole run (~60 s of
  CPU on 2 cores: data, reference pass, step and eval compiles)."""
  workdir = str(tmp_path / "run")
  loop.run(_config(workdir), workdir)
  # Step 1 starts from B = 0: policy == reference (the quantised base, adapters off).
  assert math.isclose(helpers.metrics_by_step(workdir)[1], math.log(2), rel_tol=1e-6)

  model_cfg = models.read_model_config_json(os.path.join(workdir, "model_config.json"))
  params = train_ckpt.load_params(workdir)
  assert "kernel_nf4" in params["lm"]["layers"]["attn"]["q_proj"]
  spec = lora.spec_from_config(_config(workdir).lora, model_cfg.param_dtype)
  ids = np.random.default_rng(0).integers(1, model_cfg.vocab_size, (2, 12)).astype(np.int32)
  z_jpost = np.asarray(models.logits(model_cfg, lora.attach(params["lm"], params["lora"], spec),
                                     ids))
  z_base = np.asarray(models.logits(model_cfg, params["lm"], ids))
  assert np.abs(z_jpost - z_base).max() > 1e-2           # the trained adapters matter

  merged = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(workdir, "merged"), attn_implementation="eager").eval()
  np.testing.assert_allclose(_torch_logits(merged, ids), z_jpost, atol=TOL, rtol=0)

  out = str(tmp_path / "adapter")
  monkeypatch.setattr(sys, "argv", ["export_hf.py", workdir, out, "--adapters=peft"])
  helpers.load_script("export_hf").main()
  _check_peft_dir(out, ids, z_base, z_jpost, model_cfg,
                  lora.LoraSpec(rank=4, alpha=8.0, dropout=0.1, targets=spec.targets),
                  jax.device_get(params["lora"]))
  # A LoRA checkpoint is not a plain model to start another run from.
  with pytest.raises(ValueError, match="holds LoRA adapters"):
    c = _config(str(tmp_path / "next"))
    c.model.init = f"ckpt:{workdir}"
    c.lora.rank, c.lora.quantize, c.lora.dropout = 0, "none", 0.0
    loop.run(c, str(tmp_path / "next"))
