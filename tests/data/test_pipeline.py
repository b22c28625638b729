"""The grain pipeline: determinism, exact resume, per-process shards, eval passes, KTO and RL."""
import json

import numpy as np
import pytest

from jpost.data import make_eval_batches, make_tokenizer, make_train_iterator


def _data(write_jsonl, n, name="data.jsonl"):
  return write_jsonl([{"prompt": f"q{i}=", "completion": f"a{i}"} for i in range(n)], name=name)


def _ids(batch, tok):
  """The example (row number) of each valid slot, in slot order."""
  out = []
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      text = tok.decode(batch["tokens"][r][seg == s])
      out.append((int(batch["seq_index"][r][seg == s][0]), int(text[1:text.index("=")])))
  return [i for _, i in sorted(out)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_same_order_and_each_epoch_is_a_fresh_permutation(make_cfg, write_jsonl):
  cfg = make_cfg(train=_data(write_jsonl, 12), max_len=12)
  tok = make_tokenizer(cfg)
  order = lambda seed: [i for b in _take(make_train_iterator(cfg, "sft", tok, batch_size=4,
                                                             seed=seed), 6) for i in _ids(b, tok)]
  a, b, c = order(0), order(0), order(1)
  assert a == b and a != c
  assert sorted(a[:12]) == sorted(a[12:]) == list(range(12)) and a[:12] != a[12:]


@pytest.mark.parametrize("kind,pack,n,stop", [
    ("sft", False, 10, 1),        # mid-epoch, and batches that straddle epochs (10 / 4)
    ("sft", False, 12, 3),        # exactly at an epoch boundary
    ("sft", True, 12, 2),         # packed: the carried example is replayed after restore
    ("pairwise", True, 9, 3),
    ("unpaired", False, 10, 2),
])
def test_restored_iterator_replays_the_remaining_batches(make_cfg, write_jsonl, kind, pack, n,
                                                         stop):
  rows = [{"prompt": f"q{i}=", "completion": f"a{i}", "chosen": f"a{i}", "rejected": "x",
           "label": i % 2 == 0} for i in range(n)]
  cfg = make_cfg(train=write_jsonl(rows), max_len=12, pack=pack, max_examples_per_batch=5)
  tok = make_tokenizer(cfg)
  straight = _take(make_train_iterator(cfg, kind, tok, batch_size=4, seed=3), 8)
  it = make_train_iterator(cfg, kind, tok, batch_size=4, seed=3)
  _same(_take(it, stop), straight[:stop])
  state = json.loads(json.dumps(it.get_state()))     # what a checkpoint stores
  _same(_take(it, 2), straight[stop:stop + 2])       # the old iterator moves on
  resumed = make_train_iterator(cfg, kind, tok, batch_size=4, seed=3)
  resumed.set_state(state)
  _same(_take(resumed, 8 - stop), straight[stop:])


def test_restore_refuses_a_state_from_other_settings(make_cfg, write_jsonl):
  cfg = make_cfg(train=_data(write_jsonl, 8), max_len=12)
  state = make_train_iterator(cfg, "sft", batch_size=4, seed=0).get_state()
  with pytest.raises(ValueError, match=r"batch_size=4 \(now 8\)"):
    make_train_iterator(cfg, "sft", batch_size=8, seed=0).set_state(state)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shards_are_disjoint_slices_of_the_global_batch(make_cfg, write_jsonl, processes):
  cfg = make_cfg(train=_data(write_jsonl, 16), max_len=12)
  tok = make_tokenizer(cfg)
  global_batches = _take(make_train_iterator(cfg, "sft", tok, batch_size=8, seed=5), 4)
  shards = [_take(make_train_iterator(cfg, "sft", tok, batch_size=8, seed=5, process_index=p,
                                      process_count=processes), 4) for p in range(processes)]
  local = 8 // processes
  for step, full in enumerate(global_batches):
    parts = [shards[p][step] for p in range(processes)]
    assert all(b["tokens"].shape == (local, 12) for b in parts)
    # Process p holds rows [p*b, (p+1)*b) of the global batch, in order; slots are local.
    for key in full:
      joined = np.concatenate([b[key] for b in parts])
      if key == "seq_index":
        joined = np.concatenate([np.where(b[key] >= 0, b[key] + p * local, -1)
                                 for p, b in enumerate(parts)])
      np.testing.assert_array_equal(joined, full[key], err_msg=key)
    got = [i for b in parts for i in _ids(b, tok)]
    assert got == _ids(full, tok) and len(set(got)) == len(got) == 8


def test_packed_process_streams_cover_an_epoch_without_overlap(make_cfg, write_jsonl):
  cfg = make_cfg(train=_data(write_jsonl, 21), max_len=16, pack=True, num_epochs=1)
  tok = make_tokenizer(cfg)
  seen = []
  for p in range(3):
    for b in make_train_iterator(cfg, "sft", tok, batch_size=3, seed=0, process_index=p,
                                 process_count=3):
      assert b["tokens"].shape == (1, 16)
      seen += _ids(b, tok)
  assert sorted(seen) == list(range(21))


def test_eval_is_one_unshuffled_padded_pass(make_cfg, write_jsonl):
  path = _data(write_jsonl, 7, name="eval.jsonl")
  cfg = make_cfg(eval=path, max_len=12, pack=True)   # eval is never packed
  tok = make_tokenizer(cfg)
  batches = make_eval_batches(cfg, "sft", tok, batch_size=3)
  assert [_ids(b, tok) for b in batches] == [[0, 1, 2], [3, 4, 5], [6]]
  assert all(b["tokens"].shape == (3, 12) for b in batches)
  np.testing.assert_array_equal(batches[-1]["example_valid"], [1, 0, 0])
  assert make_eval_batches(cfg, "sft", tok, batch_size=3) is not batches   # a fresh pass
  # Two processes: the same number of batches each, together the whole set once.
  parts = [make_eval_batches(cfg, "sft", tok, batch_size=4, process_index=p, process_count=2)
           for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == 2
  assert sorted(i for part in parts for b in part for i in _ids(b, tok)) == list(range(7))
  cfg.eval = ""
  assert make_eval_batches(cfg, "sft", tok, batch_size=3) == []


def test_kto_mismatch_pairs_completion_i_with_prompt_i_plus_1(make_cfg, write_jsonl):
  rows = [{"prompt": f"q{i}=", "completion": f"a{i}", "label": i < 2} for i in range(3)]
  cfg = make_cfg(train=write_jsonl(rows), max_len=12, shuffle=False, num_epochs=1)
  tok = make_tokenizer(cfg)
  b = next(make_train_iterator(cfg, "unpaired", tok, batch_size=4, seed=0))   # 3 rows + 1 pad
  np.testing.assert_array_equal(b["label"], [1, 1, 0, 0])
  np.testing.assert_array_equal(b["example_valid"], [1, 1, 1, 0])
  texts = [tok.decode(b["mismatch_tokens"][i]) for i in range(3)]
  assert texts == ["q1=a0", "q2=a1", "q0=a2"]   # cycles over the valid examples
  trained = [tok.decode(b["mismatch_targets"][i][b["mismatch_loss_mask"][i] == 1], False)
             for i in range(3)]
  assert trained == ["a0</s>", "a1</s>", "a2</s>"]
  np.testing.assert_array_equal(b["mismatch_seq_index"][:3, 0], [0, 1, 2])
  assert not b["mismatch_segment_ids"][3].any()


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rl_prompt_batches(make_cfg, write_jsonl, padding):
  rows = [{"prompt": "1+1=", "answer": 2, "references": "two"}, {"prompt": "10+10=",
                                                                 "answer": "20"}]
  cfg = make_cfg(train=write_jsonl(rows), max_prompt_len=8, rl_padding=padding, shuffle=False)
  tok = make_tokenizer(cfg)
  b = next(make_train_iterator(cfg, "rl", tok, batch_size=2, seed=0))
  assert b["prompt_tokens"].shape == (2, 8)
  np.testing.assert_array_equal(b["prompt_lengths"], [5, 7])
  for i, prompt in enumerate(["1+1=", "10+10="]):
    n = b["prompt_lengths"][i]
    ids = b["prompt_tokens"][i, 8 - n:] if padding == "left" else b["prompt_tokens"][i, :n]
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + prompt
    assert b["prompt_tokens"][i].astype(bool).sum() == n
  assert b["rows"][0]["answer"] == 2 and b["rows"][0]["references"] == ["two"]
  assert b["rows"][1]["where"].endswith("data.jsonl:2")


def test_pipeline_transforms_pickle(make_cfg, write_jsonl):
  """grain's multiprocess prefetch pickles the transforms into worker processes."""
  import pickle
  from jpost.data import prepare
  from jpost.data.pipeline import EpochOrder, _LocalBatch
  cfg = make_cfg(train=_data(write_jsonl, 6), max_len=12)
  tok = make_tokenizer(cfg)
  store = prepare(cfg, cfg.train, "sft", tok, verbose=False)
  order = EpochOrder(len(store), 3, seed=7, shuffle=True)
  collate = _LocalBatch(store, local=2, process_index=1, max_len=12, bos_id=tok.bos_id)
  order2, collate2 = pickle.loads(pickle.dumps((order, collate)))
  assert [order2[i] for i in range(18)] == [order[i] for i in range(18)]
  assert sorted(order[i] for i in range(6, 12)) == list(range(6))
  _same([collate2(np.arange(4))], [collate(np.arange(4))])


@pytest.mark.parametrize("kind,pack,processes", [
    ("sft", False, 1), ("pairwise", False, 2), ("pairwise", True, 1), ("pairwise", True, 2),
    ("unpaired", False, 2)])
def test_example_id_names_the_dataset_example_of_each_slot(make_cfg, write_jsonl, kind, pack,
                                                           processes):
  """`example_id` [S] indexes the encoded dataset (pairs: both slots), -1 on padding slots."""
  n = 7
  if kind == "pairwise":
    rows = [{"prompt": f"q{i}=", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(n)]
  elif kind == "unpaired":
    rows = [{"prompt": f"q{i}=", "completion": f"a{i}", "label": i % 2 == 0} for i in range(n)]
  else:
    rows = [{"prompt": f"q{i}=", "completion": f"a{i}"} for i in range(n)]
  cfg = make_cfg(train=write_jsonl(rows), max_len=12, pack=pack, num_epochs=1)
  tok = make_tokenizer(cfg)
  seen = []
  for p in range(processes):
    for b in make_train_iterator(cfg, kind, tok, batch_size=4, seed=3, process_index=p,
                                 process_count=processes):
      ids, valid = b["example_id"], b["example_valid"]
      assert ids.dtype == np.int32 and ids.shape == valid.shape
      np.testing.assert_array_equal(ids < 0, valid == 0)
      for slot in np.flatnonzero(valid):
        # The slot's tokens are the example's: prompt q{i}= holds the dataset row number.
        row, col = np.argwhere(b["seq_index"] == slot)[0]
        text = tok.decode(b["tokens"][row][b["seq_index"][row] == slot])
        assert int(text[1:text.index("=")]) == ids[slot]
      if kind == "pairwise":   # both slots of a pair name the pair
        np.testing.assert_array_equal(ids[0::2], ids[1::2])
      seen += [int(i) for i in ids[valid > 0][::2 if kind == "pairwise" else 1]]
  assert sorted(seen) == list(range(n))
