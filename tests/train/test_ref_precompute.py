"""ref.precompute: a run reading S_ref from the one-time table equals one running the reference
in every step; the table is cached on disk, reused on resume and keyed by dataset and reference."""
import importlib
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest

from jpost import data as jdata
from jpost import models
from jpost.checkpoints import fingerprint
from jpost.losses import registry
from jpost.train import loop, ref_cache
from jpost.train import step as tstep

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_rows(path, kind, n=24, shift=0):
  with open(path, "w") as f:
    for i in range(n):
      a, b = (i + shift) % 10, (3 * i) % 7
      right, wrong = str(a + b), str(a + b + 10)
      if kind == "pairwise":
        f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen": right, "rejected": wrong}) + "\n")
      else:
        f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": right if i % 2 else wrong,
                            "label": bool(i % 2)}) + "\n")
  return str(path)


def _config(recipe, data_path, **overrides):
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    c = importlib.import_module(recipe).get_config()
  finally:
    sys.path.pop(0)
  flags = {"train.steps": 3, "train.batch_size": 8, "train.log_every": 1,
           "warm_start.sft_steps": 0, "optim.lr": 3e-3, "optim.warmup_steps": 0,
           "eval.every_steps": 0, "eval.batch_size": 8, "checkpoint.every_steps": 2,
           "log.tensorboard": False, "data.max_len": 16, "data.train": data_path,
           "data.eval": data_path}
  flags.update(overrides)
  for key, value in flags.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def _losses(workdir):
  return helpers.metrics_by_step(workdir)


def _without_reference(make_train_step):
  """Wraps make_train_step so the step fails if handed reference params (it must not need them)."""
  def make(*args, **kwargs):
    fn = make_train_step(*args, **kwargs)

    def step(state, ref_params, batch):
      assert ref_params is None, "the step got reference params under ref.precompute"
      assert "ref_seq_logp" in batch
      return fn(state, ref_params, batch)
    return step
  return make


def _must_not_run(*args, **kwargs):
  raise AssertionError("the reference table was recomputed instead of read from the cache")


@pytest.mark.parametrize("recipe,kind,overrides", [
    ("dpo", "pairwise", {"data.pack": True}),   # packed pairs: example ids through the packer
    # Stateful unpaired objective. Slow (~30 s of 2 cores): the cache path is the dpo case's.
    pytest.param("bco", "unpaired", {}, marks=pytest.mark.slow),
])
def test_precompute_equals_reference_in_the_step(tmp_path, recipe, kind, overrides, capsys,
                                                 monkeypatch):
  data = _write_rows(tmp_path / "data.jsonl", kind)
  straight = str(tmp_path / "straight")
  base = loop.run(_config(recipe, data, **overrides), straight)
  monkeypatch.setattr(tstep, "make_train_step", _without_reference(tstep.make_train_step))
  cached = str(tmp_path / "cached")
  got = loop.run(_config(recipe, data, **overrides, **{"ref.precompute": True}), cached)
  want, have = _losses(straight), _losses(cached)
  assert sorted(want) == sorted(have) == [1, 2, 3]
  for s in want:
    assert abs(want[s] - have[s]) <= 1e-5, (s, want[s], have[s])
  assert abs(base["last_eval"]["eval/loss"] - got["last_eval"]["eval/loss"]) <= 1e-5
  tables = sorted(os.listdir(os.path.join(cached, "ref_cache")))
  assert len(tables) == 2 and all(t.endswith(".npz") for t in tables)   # train + eval
  with np.load(os.path.join(cached, "ref_cache", tables[0]), allow_pickle=False) as f:
    assert np.isfinite(f["table"]).all()
  out = capsys.readouterr().out
  assert out.count("scored") == 2 and "reusing" not in out

  if recipe != "dpo":
    return
  # Resume after step 2 (as if killed before the step-3 checkpoint): the tables are read back,
  # not recomputed, and step 3 matches the uninterrupted runs.
  shutil.rmtree(os.path.join(cached, "checkpoints", "3"))
  monkeypatch.setattr(ref_cache, "compute_table", _must_not_run)
  monkeypatch.setattr(ref_cache, "score_batches", _must_not_run)
  loop.run(_config(recipe, data, **overrides, **{"ref.precompute": True}), cached)
  out = capsys.readouterr().out
  assert "resumed from" in out and out.count("reusing") == 2
  assert sorted(os.listdir(os.path.join(cached, "ref_cache"))) == tables
  assert abs(_losses(cached)[3] - want[3]) <= 1e-5


def test_cache_key_follows_dataset_and_reference(tmp_path):
  cfg = jdata.config.default_config()
  cfg.max_len = 16
  tok = jdata.make_tokenizer(cfg)
  store = lambda path: jdata.prepare(cfg, path, "pairwise", tok, verbose=False)
  a = store(_write_rows(tmp_path / "a.jsonl", "pairwise"))
  a2 = store(_write_rows(tmp_path / "a2.jsonl", "pairwise"))
  b = store(_write_rows(tmp_path / "b.jsonl", "pairwise", shift=1))
  assert ref_cache.dataset_digest(a) == ref_cache.dataset_digest(a2)
  assert ref_cache.dataset_digest(a) != ref_cache.dataset_digest(b)

  model_cfg = models.get_model_config("tiny")
  params = {"lm": models.init_params(model_cfg, jax.random.PRNGKey(0))}
  fp = fingerprint.params_fingerprint(params)
  key = lambda store, ref_id=fp, c=cfg: ref_cache.train_cache_key(
      ml_collections.ConfigDict({"data": c}), model_cfg, ref_id, store)
  assert key(a) == key(a)
  assert len({key(a), key(b), key(a, ref_id="other"), key(a, c=dict(cfg, max_len=17))}) == 4
  assert fp == fingerprint.params_fingerprint(jax.tree.map(np.array, params))
  # One changed element anywhere changes it.
  leaves, treedef = jax.tree.flatten(params)
  bumped = [np.array(x) for x in leaves]
  bumped[-1].reshape(-1)[-1] += 1e-3
  assert fp != fingerprint.params_fingerprint(jax.tree.unflatten(treedef, bumped))
  # Sharded over 8 devices: the same value (the per-leaf sums are exact integer sums).
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(-1), ("x",))
  spec = lambda x: jax.sharding.PartitionSpec("x") if x.ndim and x.shape[0] % 8 == 0 \
      else jax.sharding.PartitionSpec()
  sharded = jax.tree.map(lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec(x))),
                         params)
  assert fp == fingerprint.params_fingerprint(sharded)


def test_lookup_reads_each_slot_of_pairs_and_padding():
  table = np.asarray([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]], np.float32)
  batch = {"example_id": np.asarray([2, 2, 0, 0, -1, -1], np.int32)}
  np.testing.assert_array_equal(ref_cache.lookup(table, batch)["ref_seq_logp"],
                                [-5, -6, -1, -2, 0, 0])


@pytest.mark.parametrize("name,supported", [
    ("sigmoid", True), ("implicit_prm", True), ("bco", True),
    ("simpo", False), ("orpo", False), ("rm_bt", False),          # reference-free: a no-op
    ("kto", "mismatched"), ("sft_kl", "full-vocabulary")])        # refused, with the reason
def test_which_objectives_precompute(name, supported, capsys):
  from jpost.train import config as tconfig
  cfg = tconfig.base_config(name)
  cfg.ref.precompute = True
  objective = registry.get_objective(name)
  if isinstance(supported, str):
    with pytest.raises(ref_cache.PrecomputeUnsupported, match=supported):
      ref_cache.enabled(cfg, objective)
    return
  assert ref_cache.enabled(cfg, objective) is supported
  if not supported:
    assert "reference-free" in capsys.readouterr().out
  cfg.ref.precompute = False
  assert ref_cache.enabled(cfg, objective) is False
