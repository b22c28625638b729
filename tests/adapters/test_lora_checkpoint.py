"""LoRA / QLoRA checkpoints hold what trains (adapters, optimiser state, RNG, counters, data state),
not the frozen base: a resume puts back the base the run rebuilt from its config, readers
(`load_params`, `resolve.load`, `export_hf.py`) rebuild it the same way, and both refuse a base
whose fingerprint differs from the one saved with the adapters."""
import json
import os
import re
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jpost import models
from jpost.adapters import lora
from jpost.adapters import peft as jpeft
from jpost.checkpoints import train_ckpt
from jpost.models import resolve
from jpost.train import loop
from jpost.train import sharding
from jpost.train import step as tstep

import helpers

CFG = models.get_model_config("tiny")
FROZEN = train_ckpt.FROZEN_BASE


def _du(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _saved_params(directory, step):
  """The params tree of a saved state, from orbax's item metadata (no arrays read)."""
  manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    return manager.item_metadata(step)["state"]["params"]
  finally:
    manager.close()


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def _changed(lm):
  """`lm` with one embedding element nudged by one ulp."""
  emb = np.array(lm["embed"]["embedding"])
  emb[3, 5] = np.nextafter(emb[3, 5], np.float32(np.inf))
  return dict(lm, embed=dict(lm["embed"], embedding=emb))


def test_checkpointer_leaves_the_base_out_and_restores_the_runs_own(tmp_path):
  """A TrainState as the loop builds it (float32 base, AdamW on the adapters): the adapter-only
  checkpoint has no `lm` arrays and is a fraction of the full one; restoring it puts back the
  given base once its fingerprint matches; a full (pre-existing) LoRA checkpoint restores as
  it is; another base is refused with the differing array named."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.default_rules()
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  with sharding.axis_rules(rules, mesh):
    params, axes, shardings = lora.add_adapters(
        {"lm": helpers.random_params(CFG)}, {"lm": models.param_logical_axes(CFG)}, spec, CFG,
        mesh, rules, jax.random.PRNGKey(1))
  params = jax.device_put(params, shardings)
  state = tstep.init_state(params, optax.adamw(1e-3), 0)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  fingerprint = train_ckpt.base_fingerprint(params["lm"], "test base")
  assert fingerprint == train_ckpt.base_fingerprint(jax.device_get(params["lm"]), "test base")
  meta = {"seed": 0, FROZEN: fingerprint}

  full, adapters = str(tmp_path / "full"), str(tmp_path / "adapters")
  for directory, m in ((full, {"seed": 0}), (adapters, meta)):
    ckpt = train_ckpt.Checkpointer(directory, async_save=False)
    ckpt.save(1, state, {}, m)
    ckpt.close()
  assert sorted(_saved_params(full, 1)) == ["lm", "lora"]
  assert sorted(_saved_params(adapters, 1)) == ["lora"]
  base_bytes = lora.tree_bytes(params["lm"])
  size_full, size_adapters = _du(f"{full}/1"), _du(f"{adapters}/1")
  print(f"checkpoint bytes: full state {size_full}, adapter-only {size_adapters}, "
        f"base {base_bytes}")
  assert size_full - size_adapters >= 0.9 * base_bytes
  assert size_adapters < size_full / 3

  ckpt = train_ckpt.Checkpointer(adapters, async_save=False)
  restored, _, saved_meta = ckpt.restore(1, abstract, meta, base=params["lm"])
  assert saved_meta[FROZEN] == fingerprint
  _equal(restored, state)
  other = _changed(jax.device_get(params["lm"]))
  with pytest.raises(train_ckpt.IncompatibleCheckpoint,
                     match=r"adapters/1: the LoRA adapters were trained on another frozen base "
                           r"\(checkpoint: test base; now: other\); 1 of 12 base arrays differ: "
                           r"embed/embedding: float32\[512, 64\] "):
    ckpt.restore(1, abstract, {FROZEN: train_ckpt.base_fingerprint(other, "other")}, base=other)
  with pytest.raises(train_ckpt.IncompatibleCheckpoint, match="this run has no LoRA adapters"):
    ckpt.restore(1, abstract, {"seed": 0})
  ckpt.close()

  # Checkpoints of LoRA runs that hold the base (written before adapter-only saves).
  ckpt = train_ckpt.Checkpointer(full, async_save=False)
  restored, _, _ = ckpt.restore(1, abstract, meta, base=params["lm"])
  _equal(restored, state)
  with pytest.raises(train_ckpt.IncompatibleCheckpoint, match="another frozen base"):
    ckpt.restore(1, abstract, {FROZEN: train_ckpt.base_fingerprint(other, "other")}, base=other)
  ckpt.close()


# ------------------------------------------------------------------ a QLoRA run through the loop

FLAGS = {"train.steps": 4, "train.batch_size": 8, "train.log_every": 1, "optim.lr": 1e-2,
         "optim.warmup_steps": 0, "checkpoint.every_steps": 2, "checkpoint.keep": 3,
         "data.eval": "", "data.max_len": 24, "log.tensorboard": False, "log.plot": False,
         "lora.rank": 4, "lora.alpha": 8.0, "lora.quantize": "nf4"}


def _config(flags):
  """configs/sft.py with `flags` ({dotted key: value}) set, as scripts/train.py would."""
  c = helpers.load_config("sft")
  for key, value in flags.items():
    *path, name = key.split(".")
    section = c
    for p in path:
      section = section[p]
    section[name] = value
  return c


def _export(monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", ["export_hf.py", *argv])
  helpers.load_script("export_hf").main()


def _qlora_run(tmp_path):
  """An NF4 QLoRA SFT run (bfloat16 adapters) from an HF directory -> (hf_dir, flags, compile
  cache env, workdir)."""
  hf_dir = str(tmp_path / "hf")
  models.save_hf(CFG, helpers.random_params(CFG), hf_dir)
  flags = dict(FLAGS, **{"model.init": f"hf:{hf_dir}"})
  cache = helpers.compile_cache_env(tmp_path / "jax_cache")
  straight = str(tmp_path / "straight")
  r = helpers.train(straight, flags, extra_env=cache)
  assert r.returncode == 0, r.stderr[-3000:]
  return hf_dir, flags, cache, straight


# Slow (two more training processes, ~50 s): the default run covers adapter-only restore and its
# exactness in the unit test above, state dtypes that survive an update
# (tests/models/test_precision_options.py) and kill-and-resume (tests/train/test_resume.py).
@pytest.mark.slow
def test_killed_qlora_run_resumes_exactly(tmp_path):
  """The QLoRA run SIGKILLed after its step-2 checkpoint and resumed repeats the uninterrupted
  run bit for bit; its checkpoints hold no base arrays."""
  _, flags, cache, straight = _qlora_run(tmp_path)
  killed = str(tmp_path / "killed")
  r = helpers.train(killed, flags, fault="kill_after_save:2", extra_env=cache)
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  assert max(helpers.metrics_by_step(killed)) == 2
  r = helpers.train(killed, flags, extra_env=cache)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  a, b = helpers.metrics_by_step(straight), helpers.metrics_by_step(killed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert a == b
  for step in (2, 4):
    assert sorted(_saved_params(os.path.join(killed, "checkpoints"), step)) == ["lora"]
  _equal(train_ckpt.load_params(straight), train_ckpt.load_params(killed))


def test_qlora_readers_rebuild_its_base_and_refuse_another(tmp_path, monkeypatch):
  """A QLoRA run's checkpoints hold no base arrays; load_params, resolve.load and export_hf.py
  (merged and PEFT) see the base the run had (the HF weights, quantised) and its adapters; after
  the quantisation or the HF files change, a reader and a resume both refuse."""
  hf_dir, flags, _, straight = _qlora_run(tmp_path)
  checkpoints = os.path.join(straight, "checkpoints")
  for step in (2, 4):
    assert sorted(_saved_params(checkpoints, step)) == ["lora"]
  with open(os.path.join(checkpoints, "4", "meta", "metadata")) as f:
    leaves = json.load(f)[FROZEN]["leaves"]
  assert "float32" in leaves["embed/embedding"] and "uint8" in leaves[
      "layers/attn/q_proj/kernel_nf4"]

  # Readers rebuild the base from config.json: what a checkpoint holding it gave them.
  params = train_ckpt.load_params(straight)
  section = _config(flags).lora
  spec = lora.spec_from_config(section)
  base = jax.jit(lora.quantize_base, static_argnums=(1, 2))(models.load_hf(hf_dir)[1], spec, CFG)
  _equal(params["lm"], base)
  merged = jax.device_get(lora.export_lm({"lm": base, "lora": params["lora"]}, section, CFG))
  _, resolved = resolve.load(resolve.resolve(straight))
  _equal(resolved, {"lm": merged})
  _export(monkeypatch, straight, str(tmp_path / "merged"))
  _equal(models.load_hf(str(tmp_path / "merged"))[1], merged)
  _export(monkeypatch, straight, str(tmp_path / "peft"), "--adapters=peft")
  _equal(jpeft.load(str(tmp_path / "peft"), CFG)[1], params["lora"])
  _equal(models.load_hf(str(tmp_path / "peft" / "base"))[1], lora.dequantized_base(base, CFG))

  # Another quantisation, then other HF files: resumes and readers refuse, naming the arrays.
  with pytest.raises(train_ckpt.IncompatibleCheckpoint,
                     match=r"\(checkpoint: .*lora.quantize=nf4; now: .*lora.quantize=int8\); "
                           r".*layers/attn/k_proj/kernel_int8: absent -> int8\[2, 64, 2, 16\] "):
    loop.run(_config(dict(flags, **{"lora.quantize": "int8"})), straight, _summary=False)
  models.save_hf(CFG, helpers.random_params(CFG, seed=1), hf_dir)
  with pytest.raises(train_ckpt.IncompatibleCheckpoint,
                     match=re.escape(f"{straight}/checkpoints/4: the LoRA adapters were trained "
                                     f"on another frozen base (checkpoint: model.init=hf:{hf_dir}, "
                                     "lora.quantize=nf4; now: ") + r".*\); \d+ of \d+ base arrays "
                           r"differ: embed/embedding: "):
    train_ckpt.load_params(straight)
  with pytest.raises(train_ckpt.IncompatibleCheckpoint,
                     match=r"checkpoints/4: the LoRA adapters were trained on another frozen base"
                           r".*the resuming run must rebuild the same base"):
    loop.run(_config(flags), straight, _summary=False)


@pytest.mark.slow
def test_killed_lora_grpo_run_resumes_exactly(tmp_path):
  """The online loop's LoRA checkpoints hold no base either; GRPO (KL to the base, 2 updates per
  iteration) SIGKILLed after its iteration-2 checkpoint and resumed repeats the uninterrupted run:
  losses, rewards, ratios, KL and the final adapters. Rewards are graded, so groups differ and
  the adapters move. Slow (~40 s of 2 cores, three runs): the online loop resumes through the
  offline loop's `resume` (tested above), and its adapter-only save and rebuilt base are checked
  by test_lora_grpo_samples_and_trains_the_adapted_policy_against_the_base (tests/rl)."""
  (tmp_path / "graded_reward.py").write_text(
      "def byte_sum(row, completion):\n  return float(sum(completion.encode()) % 7) / 7\n")
  env = dict(helpers.compile_cache_env(tmp_path / "jax_cache"),
             PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path),
                                                      os.environ.get("PYTHONPATH")])))
  flags = {"train.steps": 4, "train.batch_size": 4, "rl.group_size": 2, "rl.max_new_tokens": 4,
           "rl.mini_batches": 2, "rl.rewards": "graded_reward:byte_sum",
           "warm_start.sft_steps": 0, "checkpoint.every_steps": 2, "data.eval": "",
           "log.tensorboard": False, "log.plot": False, "train.log_every": 1, "optim.lr": 1e-2,
           "lora.rank": 4, "lora.alpha": 8.0}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  r = helpers.train(straight, flags, recipe="configs/grpo.py", extra_env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  r = helpers.train(killed, flags, recipe="configs/grpo.py", fault="kill_after_save:2",
                    extra_env=env)
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  r = helpers.train(killed, flags, recipe="configs/grpo.py", extra_env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  keys = ("train/loss", "rollout/reward_mean", "pg/ratio_mean", "pg/kl")
  a, b = helpers.metrics_by_step(straight, *keys), helpers.metrics_by_step(killed, *keys)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert a == b
  assert a[4][3] > 0                           # the adapted policy has moved off the base
  for step in (2, 4):
    assert sorted(_saved_params(os.path.join(killed, "checkpoints"), step)) == ["lora"]
  _equal(train_ckpt.load_params(straight), train_ckpt.load_params(killed))
