"""The online loop's host-side pieces: rollout rows, HPT / LUFFY / Prefix-RFT assembly, resume."""
import json
import sys

import jax
import numpy as np
import pytest

from jpost import models
from jpost.checkpoints import train_ckpt
from jpost.data import tokenizer as tok_lib
from jpost.rl import loop as rl_loop
from jpost.rl import rollout
from jpost.train import config as tconfig
from jpost.train import sharding

import helpers

def _response(prompt, ids, logp=None, **kw):
  return rollout.Response(prompt_ids=np.asarray(prompt, np.int32), ids=np.asarray(ids, np.int32),
                          sampler_logp=None if logp is None else np.asarray(logp, np.float32),
                          **kw)


def test_build_batch_aligns_response_tokens_with_targets():
  rows = [_response([1, 5, 6], [7, 8, 2], [-0.1, -0.2, -0.3]),
          None,
          _response([1, 9], [3, 2], source="demo_sft"),
          _response([1, 4], [5, 6, 7, 2], [0.0, 0.0, -0.5, -0.6], prefix_len=2)]
  b = rollout.build_batch(rows, 8, mixing_keys=("offline_mask",))
  # Row 0: prompt 3 tokens, response 3; targets at positions 2..4 are the response tokens.
  np.testing.assert_array_equal(b["tokens"][0], [1, 5, 6, 7, 8, 2, 0, 0])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(b["targets"][0][b["loss_mask"][0] > 0], [7, 8, 2])
  np.testing.assert_allclose(b["sampler_logp"][0][2:5], [-0.1, -0.2, -0.3])
  assert b["example_valid"].tolist() == [1, 0, 1, 1]
  assert b["loss_mask"][1].sum() == 0 and (b["seq_index"][1] == -1).all()
  np.testing.assert_array_equal(b["sft_mask"][2], b["loss_mask"][2])
  assert b["sft_mask"][[0, 3]].sum() == 0
  assert b["offline_mask"].sum() == 0            # named, so present (one compile), but unused
  np.testing.assert_array_equal(b["prefix_mask"][3], [0, 1, 1, 0, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="exceed the rollout width"):
    rollout.build_batch([_response([1] * 5, [2] * 4)], 8)


def test_pass_at_k():
  assert rollout.pass_at_k([[0, 0, 1], [0, 0, 0]]) == 0.5


def _setup(preset, **rl_overrides):
  cfg = tconfig.base_config(preset)
  cfg.rl.update(group_size=4, max_new_tokens=6, **rl_overrides)
  cfg.train.batch_size = 3
  cfg.data.max_prompt_len = 8
  if preset == "hpt":
    cfg.objective.hpt.n = 4
  model_cfg = models.get_model_config("tiny")
  tok = tok_lib.make_tokenizer(cfg.data)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return rl_loop._make_setup(cfg, cfg.objective, model_cfg, tok, mesh), cfg


def _group(setup, prompt, correct, demo):
  g = setup.group_size
  resp = [_response(prompt, [10 + j, 2], [-1.0, -0.5]) for j in range(g)]
  return {"row": {"prompt": "x", "where": "t:1"}, "prompt_ids": np.asarray(prompt, np.int32),
          "responses": resp, "reward": np.asarray(correct, np.float32),
          "correct": np.asarray(correct, bool), "demo": np.asarray(demo, np.int32)}


@pytest.mark.parametrize("gate", [0, 1])
def test_hpt_switches_each_prompt_exactly_at_the_gate(gate):
  setup, _ = _setup("hpt")
  setup.pg_cfg.hpt.gate = gate
  counts = [0, 1, 2]           # correct rollouts per prompt
  groups = [_group(setup, [1, 40 + n], [1] * k + [0] * (4 - k), [50, 51, 2])
            for n, k in enumerate(counts)]
  batch, seq_adv, _, stats = rl_loop.assemble(setup, groups)
  per = setup.rows_per_group
  assert per == 5 and batch["tokens"].shape[0] == 15
  for n, k in enumerate(counts):
    rows = slice(n * per, (n + 1) * per)
    valid = batch["example_valid"][rows]
    if k <= gate:   # SFT on the demonstration only
      assert valid.tolist() == [1, 0, 0, 0, 0]
      np.testing.assert_array_equal(batch["sft_mask"][n * per], batch["loss_mask"][n * per])
    else:           # policy gradient on the rollouts only, Dr.GRPO advantages (r - mean)
      assert valid.tolist() == [0, 1, 1, 1, 1]
      assert batch["sft_mask"][rows].sum() == 0
      r = np.array([1.0] * k + [0.0] * (4 - k))
      np.testing.assert_allclose(seq_adv[n * per + 1:(n + 1) * per], r - r.mean(), rtol=1e-6)
  assert stats["hpt/sft_frac"] == pytest.approx(sum(k <= gate for k in counts) / 3)


def test_srft_adds_the_demonstration_row_beside_the_rollouts():
  setup, _ = _setup("srft")
  groups = [_group(setup, [1, 40], [1, 0, 0, 0], [50, 2])]
  batch, _, _, _ = rl_loop.assemble(setup, groups)
  assert batch["example_valid"][:5].tolist() == [1, 1, 1, 1, 1]
  assert batch["sft_mask"][0].sum() == 2 and batch["sft_mask"][1:].sum() == 0


@pytest.fixture(scope="module")
def tiny_lm():
  return models.init_params(models.get_model_config("tiny"), jax.random.PRNGKey(0))


def _prompt_batch(setup, prompts, demos):
  tok = setup.tokenizer
  ids = [tok.encode(p) for p in prompts]
  tokens, lengths = rollout.left_pad(ids, 8)
  rows = [{"prompt": p, "answer": d, "demonstration": d, "where": f"t:{i + 1}"}
          for i, (p, d) in enumerate(zip(prompts, demos))]
  return {"prompt_tokens": tokens, "prompt_lengths": lengths,
          "example_valid": np.ones(len(prompts), np.float32), "rows": rows}


def test_luffy_replaces_one_rollout_per_group_with_the_demonstration(tiny_lm):
  setup, _ = _setup("luffy")
  b = _prompt_batch(setup, ["1+2=", "3+4=", "9-1="], ["3", "7", "8"])
  groups, _ = rl_loop._sample_groups(setup, tiny_lm, b, jax.random.PRNGKey(1),
                                     np.random.default_rng(0), 0.0)
  for grp in groups:
    demo = grp["responses"][-1]
    assert demo.source == "demo_offline" and demo.sampler_logp is None
    assert grp["correct"][-1]            # the demonstration is scored like a rollout
    assert all(r.source == "rollout" for r in grp["responses"][:-1])
  batch, _, _, _ = rl_loop.assemble(setup, groups)
  g = setup.group_size
  for n in range(3):
    np.testing.assert_array_equal(batch["offline_mask"][n * g + g - 1],
                                  batch["loss_mask"][n * g + g - 1])
    assert batch["offline_mask"][n * g:n * g + g - 1].sum() == 0


def test_prefix_rft_keeps_a_generated_token_and_masks_low_entropy_prefix(tiny_lm):
  setup, cfg = _setup("prefix_rft")
  setup.pg_cfg.prefix.num_prefixed = 2
  demos = ["12345", "678", "90"]
  b = _prompt_batch(setup, ["a=", "b=", "c="], demos)
  groups, _ = rl_loop._sample_groups(setup, tiny_lm, b, jax.random.PRNGKey(2),
                                     np.random.default_rng(0), 0.0)
  for grp, demo in zip(groups, demos):
    demo_ids = grp["demo"]
    for j, r in enumerate(grp["responses"]):
      if j < 2:   # prefixed: a proper prefix of the demonstration, then >= 1 generated token
        assert 0 <= r.prefix_len <= len(demo_ids) - 1
        np.testing.assert_array_equal(r.ids[:r.prefix_len], demo_ids[:r.prefix_len])
        assert len(r.ids) - r.prefix_len >= 1
        assert (r.sampler_logp[:r.prefix_len] == 0).all()
      else:
        assert r.prefix_len == 0
  batch, seq_adv, responses, _ = rl_loop.assemble(setup, groups)
  # Entropy-based clipping: only the top 20% highest-entropy prefix tokens keep the advantage.
  entropy = np.random.default_rng(3).uniform(size=batch["tokens"].shape).astype(np.float32)
  pre = {"policy": np.zeros_like(entropy), "entropy": entropy}
  batch, _ = rl_loop.finish_batch(setup, batch, seq_adv, groups, responses, pre)
  keep, prefix = batch["adv_keep_mask"], batch["prefix_mask"]
  for row in range(prefix.shape[0]):
    idx = np.flatnonzero(prefix[row])
    if idx.size == 0:
      assert (keep[row] == 1).all()
      continue
    k = int(np.ceil(0.2 * idx.size))
    top = idx[np.argsort(-entropy[row, idx], kind="stable")[:k]]
    assert set(np.flatnonzero(keep[row][idx] == 1)) == {int(np.searchsorted(idx, t)) for t in top}
    assert (keep[row][prefix[row] == 0] == 1).all()


def test_missing_demonstration_names_the_row(tiny_lm):
  setup, _ = _setup("luffy")
  b = _prompt_batch(setup, ["1+2="], ["3"])
  b["rows"][0]["demonstration"] = ""
  with pytest.raises(ValueError, match="t:1.*demonstration"):
    rl_loop._sample_groups(setup, tiny_lm, b, jax.random.PRNGKey(1), np.random.default_rng(0),
                           0.0)


# ----------------------------------------------------------------------------------- resume

def _iterations(workdir):
  return helpers.metrics_by_step(workdir, "train/loss", "rollout/reward_mean", "pg/ratio_mean")


def test_killed_rl_run_resumes_exactly(tmp_path):
  """GRPO with 2 updates per iteration (old log-probs recomputed): SIGKILL after the iteration-2
  checkpoint, resume, and compare every iteration's loss / rewards and the final params."""
  flags = {"train.steps": 4, "train.batch_size": 4, "rl.group_size": 2, "rl.max_new_tokens": 4,
           "rl.mini_batches": 2, "warm_start.sft_steps": 0, "checkpoint.every_steps": 2,
           "data.eval": "", "log.tensorboard": False, "train.log_every": 1, "optim.lr": 1e-2}
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  r = helpers.train(straight, flags, recipe="configs/grpo.py")
  assert r.returncode == 0, r.stderr[-3000:]
  r = helpers.train(killed, flags, recipe="configs/grpo.py", fault="kill_after_save:2")
  assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
  assert max(_iterations(killed)) == 2
  r = helpers.train(killed, flags, recipe="configs/grpo.py")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "resumed from" in r.stdout
  a, b = _iterations(straight), _iterations(killed)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert a == b
  pa, pb = train_ckpt.load_params(straight), train_ckpt.load_params(killed)
  jax.tree.map(np.testing.assert_array_equal, pa, pb)


@pytest.mark.parametrize("store", ["local", "gs"])
def test_instance_filter_drops_unsolvable_prompts(tmp_path, tiny_lm, monkeypatch, capsys, store):
  import contextlib
  import types
  fake = types.ModuleType("fake_rl_rewards")
  fake.solvable = lambda row, completion: float(row["answer"] == "yes")
  monkeypatch.setitem(sys.modules, "fake_rl_rewards", fake)
  data = tmp_path / "prompts.jsonl"
  rows = [{"prompt": f"{i}?", "answer": "yes" if i % 3 else "no"} for i in range(10)]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  setup, cfg = _setup("grpo", rewards="fake_rl_rewards:solvable")
  cfg.data.train = str(data)
  setup.pg_cfg.filter.k = 2
  workdir, on_disk = str(tmp_path), tmp_path
  fake = contextlib.nullcontext()
  if store == "gs":   # one whole object, no rename
    workdir, on_disk = "gs://bucket/run", tmp_path / "gcs" / "bucket" / "run"
    fake = helpers.fake_gcs(tmp_path / "gcs", monkeypatch)
  with fake as fs:
    path = rl_loop.filter_prompts(setup, tiny_lm, workdir)
    assert path == f"{workdir}/filtered_prompts.jsonl"
    assert rl_loop.filter_prompts(setup, tiny_lm, workdir) == path     # reused on resume
  assert f"instance filter: reusing {path}" in capsys.readouterr().out
  assert fs is None or fs.renamed == []
  kept = [json.loads(line) for line in open(on_disk / "filtered_prompts.jsonl")]
  assert kept == [r for r in rows if r["answer"] == "yes"]


def test_lora_grpo_samples_and_trains_the_adapted_policy_against_the_base(tmp_path,
                                                                        monkeypatch):
  """GRPO (KL to the reference on) with LoRA: the base stays as initialised, the adapters train,
  and the sampler draws from the adapted policy: after a large first update the sampling and
  trainer log-probs of iteration 2 still agree (the base alone would be far off)."""
  import types
  from jpost.adapters import lora
  fake = types.ModuleType("fake_lora_rewards")   # graded, so a random policy's groups differ
  fake.byte_sum = lambda row, completion: float(sum(completion.encode()) % 7) / 7
  monkeypatch.setitem(sys.modules, "fake_lora_rewards", fake)
  cfg = helpers.load_config("grpo")
  cfg.rl.rewards = "fake_lora_rewards:byte_sum"
  cfg.train.update(steps=2, batch_size=4, log_every=1)
  cfg.rl.update(group_size=2, max_new_tokens=4)
  cfg.warm_start.sft_steps = 0
  cfg.optim.update(lr=5e-2, warmup_steps=0)
  cfg.eval.every_steps = 0
  cfg.data.eval = ""
  cfg.checkpoint.async_save = False
  cfg.log.update(tensorboard=False, plot=False)
  cfg.lora.update(rank=4, alpha=8.0)
  assert cfg.objective.kl_beta > 0            # the reference pass runs: it is the base
  workdir = str(tmp_path / "run")
  rl_loop.run(cfg, workdir, _summary=False)

  params = train_ckpt.load_params(workdir)
  model_cfg = models.read_model_config_json(f"{workdir}/model_config.json")
  init = models.init_params(model_cfg, jax.random.PRNGKey(cfg.train.seed))
  jax.tree.map(np.testing.assert_array_equal, params["lm"], jax.device_get(init))
  b_leaves = [x for p, x in jax.tree_util.tree_leaves_with_path(params["lora"])
              if p[-1].key == "b"]
  assert b_leaves and all(np.abs(np.asarray(x, np.float32)).max() > 0 for x in b_leaves)
  metrics = helpers.metrics_by_step(workdir, "pg/logp_gap_max", "pg/kl")
  gap, kl = metrics[2]
  print(f"iteration 2: logp gap max {gap:.2e}, kl {kl:.2e}")
  assert kl > 0                                # the adapted policy has moved off the base
  assert gap <= 1e-4, metrics
  spec = lora.spec_from_config(cfg.lora, model_cfg.param_dtype)
  ids = np.arange(1, 13, dtype=np.int32)[None]
  z_adapted = models.logits(model_cfg, lora.attach(params["lm"], params["lora"], spec), ids)
  z_base = models.logits(model_cfg, params["lm"], ids)
  diff = float(np.abs(np.asarray(z_adapted) - np.asarray(z_base)).max())
  print(f"max |adapted - base logit| {diff:.2e}")
  assert diff > 1e-3


def test_gs_workdir_every_file_goes_through_epath(tmp_path, monkeypatch):
  """A GRPO run (instance filter, rollout dumps, HF export) with gs:// workdir and export dir on
  helpers.fake_gcs (appends refused, renames logged): every file lands in the bucket as a whole
  object, nothing is renamed, and the export equals a local export of the final checkpoint.
  Orbax writes checkpoint arrays through tensorstore's own GCS driver, beyond fsspec, so the
  Checkpointer (given the gs:// path by the loop) writes to the bucket's local directory, which
  scripts/export_hf.py then reads to export to gs:// too."""
  import filecmp
  import os
  import types
  fake = types.ModuleType("fake_gcs_rewards")
  fake.solvable = lambda row, completion: float(row["answer"] == "yes")
  monkeypatch.setitem(sys.modules, "fake_gcs_rewards", fake)
  monkeypatch.setenv("JPOST_DUMP_ROLLOUTS", "1")
  data = tmp_path / "prompts.jsonl"
  rows = [{"prompt": f"{i}+1=", "answer": "yes" if i % 3 else "no"} for i in range(8)]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  cfg = helpers.load_config("grpo")
  cfg.rl.rewards = "fake_gcs_rewards:solvable"
  cfg.data.update(train=str(data), eval="")
  cfg.train.update(steps=2, batch_size=4, log_every=1)
  cfg.rl.update(group_size=2, max_new_tokens=4)
  cfg.objective.filter.update(drop_unsolvable=True, k=2)
  cfg.warm_start.sft_steps = 0
  cfg.eval.every_steps = 0
  cfg.checkpoint.async_save = False
  cfg.log.update(tensorboard=False, plot=False)
  cfg.export.update(hf_dir="gs://bucket/hf", max_shard_bytes=200_000)
  root = tmp_path / "gcs"
  checkpoint_dirs = []

  class BucketDirCheckpointer(train_ckpt.Checkpointer):
    def __init__(self, directory, **kw):
      checkpoint_dirs.append(os.fspath(directory))
      super().__init__(os.fspath(directory).replace("gs://", f"{root}/"), **kw)

  monkeypatch.setattr(train_ckpt, "Checkpointer", BucketDirCheckpointer)
  with helpers.fake_gcs(root, monkeypatch) as fs:
    rl_loop.run(cfg, "gs://bucket/run", _summary=False)
  assert fs.renamed == []
  assert checkpoint_dirs == ["gs://bucket/run/checkpoints"]
  run = root / "bucket" / "run"
  assert sorted(p.name for p in run.iterdir()) == [
      "checkpoints", "config.json", "filtered_prompts.jsonl", "metrics.jsonl",
      "model_config.json", "rollouts"]
  kept = [json.loads(line) for line in (run / "filtered_prompts.jsonl").read_text().splitlines()]
  assert kept == [r for r in rows if r["answer"] == "yes"]
  assert sorted(helpers.metrics_by_step(str(run))) == [1, 2]
  for it in (1, 2):
    with np.load(run / "rollouts" / f"iter{it:06d}.p0.npz") as dump:
      assert dump["tokens"].shape[0] == 4 * 2 and "advantages" in dump.files

  model_cfg = models.read_model_config_json(str(run / "model_config.json"))
  final = train_ckpt.load_params(str(run))
  local = str(tmp_path / "local_hf")
  models.save_hf(model_cfg, final["lm"], local, max_shard_bytes=200_000)
  exported = root / "bucket" / "hf"
  files = sorted(os.listdir(local))
  assert sorted(os.listdir(exported)) == files and "model.safetensors.index.json" in files
  for name in files:
    assert filecmp.cmp(exported / name, os.path.join(local, name), shallow=False), name
  _, loaded = models.load_hf(str(exported))
  jax.tree.map(np.testing.assert_array_equal, loaded, final["lm"])
  # scripts/export_hf.py writes to gs:// as well (from the checkpoint, one process).
  monkeypatch.setattr(sys, "argv", ["export_hf.py", str(run), "gs://bucket/script_hf"])
  with helpers.fake_gcs(root, monkeypatch) as fs:
    helpers.load_script("export_hf").main()
  assert fs.renamed == []
  _, loaded = models.load_hf(str(root / "bucket" / "script_hf"))
  jax.tree.map(np.testing.assert_array_equal, loaded, final["lm"])
