"""Packed and unpacked batches: segments, positions, seq_index, pairs, slot limits, coverage."""
import numpy as np
import pytest

from jpost.data import make_tokenizer, make_train_iterator, prepare
from jpost.data.batching import FirstFitPacker
from jpost.data.encode import Seq


def _rows(n):
  # Varied lengths so first-fit has real choices to make.
  return [{"prompt": f"{i}" * (1 + i % 5) + "=", "chosen": "y" * (1 + i % 3), "rejected": "n"}
          for i in range(n)]


def _slots(batch):
  """Reads every example slot back out of a batch, checking the token-array invariants."""
  seqs = {}
  for r in range(batch["tokens"].shape[0]):
    seg, pos = batch["segment_ids"][r], batch["positions"][r]
    used = seg > 0
    if not used.all():
      assert not used[np.argmin(used):].any(), "padding only after the last segment"
    for s in np.unique(seg[used]):
      idx = np.flatnonzero(seg == s)
      assert np.all(np.diff(idx) == 1), "a segment is contiguous"
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      slot = batch["seq_index"][r, idx]
      assert len(set(slot)) == 1 and slot[0] >= 0
      ids = batch["tokens"][r, idx]
      # Targets are the next token of the same segment; the last has none (0, untrained).
      np.testing.assert_array_equal(batch["targets"][r, idx[:-1]], ids[1:])
      assert batch["targets"][r, idx[-1]] == 0 and batch["loss_mask"][r, idx[-1]] == 0
      assert int(slot[0]) not in seqs
      seqs[int(slot[0])] = (ids, batch["loss_mask"][r, idx])
    assert np.all(batch["seq_index"][r, ~used] == -1) and not batch["loss_mask"][r, ~used].any()
    assert np.all(np.diff(seg[used]) >= 0) and (seg[used][0] == 1 if used.any() else True)
  valid = batch["example_valid"]
  assert sorted(seqs) == list(np.flatnonzero(valid)), "valid slots are exactly the filled ones"
  return seqs


@pytest.mark.parametrize("kind", ["sft", "pairwise"])
def test_packed_batches_hold_every_example_once_with_correct_segments(make_cfg, write_jsonl,
                                                                      kind):
  path = write_jsonl(_rows(23))
  cfg = make_cfg(train=path, max_len=16, pack=True, shuffle=False, num_epochs=1,
                 max_examples_per_batch=6)
  tok = make_tokenizer(cfg)
  store = prepare(cfg, path, kind, tok, verbose=False)
  batches = list(make_train_iterator(cfg, kind, tok, batch_size=2, seed=0))
  per = 2 if kind == "pairwise" else 1
  seen = []
  for b in batches:
    assert b["tokens"].shape == (2 * per, 16) and b["example_valid"].shape == (6 * per,)
    slots = _slots(b)
    assert len(slots) % per == 0
    for k in range(0, len(slots), per):
      seen.append([slots[k + j] for j in range(per)])
  # Unshuffled, one epoch: the examples come out in order, each exactly once, pairs together.
  assert len(seen) == len(store)
  for i, example in enumerate(seen):
    for j, (ids, mask) in enumerate(example):
      seq = store.seq(i * per + j)
      np.testing.assert_array_equal(ids, seq.ids)
      np.testing.assert_array_equal(mask[:-1], seq.mask[1:])
    if kind == "pairwise":
      (c, _), (r, _) = example
      p = store.seq(i * 2).prompt_len
      np.testing.assert_array_equal(c[:p], r[:p])
      assert tok.decode(c[p:]) == _rows(23)[i]["chosen"] and tok.decode(r[p:]) == "n"


def test_packing_fills_rows_first_fit_and_respects_the_slot_limit():
  def seq(n):
    return Seq(np.arange(1, n + 1, dtype=np.int32), np.r_[0, np.ones(n - 1)].astype(np.int8), 1)

  packer = FirstFitPacker(rows=2, max_len=10, slots=4)
  assert packer.add([seq(6)]) and packer.add([seq(6)])      # rows 0 and 1
  assert packer.add([seq(4), seq(3)])                        # a pair: row 0 (4), row 1 (3)
  assert not packer.add([seq(2)])                            # 4 slots used: the batch is full
  b = packer.batch()
  np.testing.assert_array_equal(b["segment_ids"], [[1] * 6 + [2] * 4, [1] * 6 + [2] * 3 + [0]])
  np.testing.assert_array_equal(b["seq_index"], [[0] * 6 + [2] * 4, [1] * 6 + [3] * 3 + [-1]])
  np.testing.assert_array_equal(b["example_valid"], [1, 1, 1, 1])
  # A pair whose second sequence fits nowhere is not split across batches.
  packer = FirstFitPacker(rows=1, max_len=10, slots=8)
  assert packer.add([seq(5)])
  assert not packer.add([seq(5), seq(2)])
  assert packer.fill == [5] and packer.used == 1


def test_unpacked_pairs_are_interleaved_rows(make_cfg, write_jsonl):
  path = write_jsonl(_rows(3))
  cfg = make_cfg(train=path, max_len=16, shuffle=False, num_epochs=1)
  tok = make_tokenizer(cfg)
  batches = list(make_train_iterator(cfg, "pairwise", tok, batch_size=2, seed=0))
  assert len(batches) == 2
  last = batches[1]
  assert last["tokens"].shape == (4, 16)
  np.testing.assert_array_equal(last["example_valid"], [1, 1, 0, 0])   # padded partial batch
  np.testing.assert_array_equal(last["seq_index"][:, 0], [0, 1, -1, -1])
  chosen = tok.decode(last["tokens"][0])
  rejected = tok.decode(last["tokens"][1])
  assert chosen == "222=yyy" and rejected == "222=n"   # row i: str(i) * (1 + i % 5)
  cfg.drop_remainder = True
  assert len(list(make_train_iterator(cfg, "pairwise", tok, batch_size=2, seed=0))) == 1


def test_pack_is_refused_for_unpaired_and_rl(make_cfg):
  cfg = make_cfg(pack=True)
  for kind in ("unpaired", "rl"):
    with pytest.raises(ValueError, match="data.pack is supported for sft and pairwise"):
      make_train_iterator(cfg, kind, batch_size=2)
