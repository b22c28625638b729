"""Encoded examples -> the static-shape batch dicts of docs/architecture.md ("Batches").

An example is a list of `encode.Seq` (one; two for a pair: chosen, rejected) or None for a padding
slot that only fills the static shape. Token arrays are [B, T]; per-example arrays [S].

A sequence of n tokens occupies n positions of its row: `tokens` holds all of it (its EOS too, so a
reward head can read the EOS hidden state), `targets[t]` is the next token of the same sequence
(0 at its last position and on padding), and `loss_mask[t] = mask[t + 1]`, i.e. 1 where
`targets[t]` is a trained token. Targets therefore never cross a packed segment boundary.

Every batch also carries `example_id` [S] int32: the index of the slot's example in the encoded
dataset (`EncodedDataset.example(i)`; both slots of a pair hold the pair's index), -1 for padding
slots or when the caller passes no ids. It ties a slot to per-example tables computed once over
the dataset (`ref.precompute`: jpost/train/ref_cache.py).
"""
import numpy as np

from jpost.data.encode import Seq

TOKEN_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "seq_index")


def empty_token_arrays(rows: int, max_len: int) -> dict:
  shape = (rows, max_len)
  return {"tokens": np.zeros(shape, np.int32), "targets": np.zeros(shape, np.int32),
          "loss_mask": np.zeros(shape, np.float32), "positions": np.zeros(shape, np.int32),
          "segment_ids": np.zeros(shape, np.int32), "seq_index": np.full(shape, -1, np.int32)}


def place(arrays: dict, seq: Seq, row: int, start: int, segment: int, slot: int) -> None:
  """Writes one sequence at arrays[*][row, start:start + n] as packed segment `segment`."""
  n = len(seq.ids)
  end = start + n
  arrays["tokens"][row, start:end] = seq.ids
  arrays["targets"][row, start:end - 1] = seq.ids[1:]
  arrays["loss_mask"][row, start:end - 1] = seq.mask[1:]
  arrays["positions"][row, start:end] = np.arange(n)
  arrays["segment_ids"][row, start:end] = segment
  arrays["seq_index"][row, start:end] = slot


def unpacked_batch(examples: list, max_len: int, per: int = 1, example_ids=None) -> dict:
  """One sequence per row: example i -> row i (pairs, per=2: chosen row 2i, rejected 2i + 1).

  `example_ids[i]`: dataset index of example i (None / absent -> `example_id` -1).
  """
  rows = len(examples) * per
  out = empty_token_arrays(rows, max_len)
  valid = np.zeros(rows, np.float32)
  ids = np.full(rows, -1, np.int32)
  for i, example in enumerate(examples):
    if example is None:
      continue
    for k, seq in enumerate(example):
      slot = i * per + k
      place(out, seq, slot, 0, 1, slot)
      valid[slot] = 1.0
      if example_ids is not None and example_ids[i] is not None:
        ids[slot] = example_ids[i]
  out["example_valid"] = valid
  out["example_id"] = ids
  return out


def _fit_pair(prompt_ids, comp_ids, comp_mask, max_len, bos_id):
  """prompt + completion cut to max_len: the prompt loses its oldest tokens (after a BOS) first."""
  over = len(prompt_ids) + len(comp_ids) - max_len
  if over > 0:
    b = 1 if bos_id is not None and len(prompt_ids) and prompt_ids[0] == bos_id else 0
    cut = min(over, len(prompt_ids) - b)
    prompt_ids = np.concatenate([prompt_ids[:b], prompt_ids[b + cut:]])
    over -= cut
  if over > 0:   # the completion alone is too long: keep its start
    comp_ids, comp_mask = comp_ids[:len(comp_ids) - over], comp_mask[:len(comp_mask) - over]
  ids = np.concatenate([prompt_ids, comp_ids]).astype(np.int32)
  mask = np.concatenate([np.zeros(len(prompt_ids), np.int8), comp_mask]).astype(np.int8)
  mask[0] = 0
  return Seq(ids, mask, len(prompt_ids))


def mismatch_arrays(examples: list, max_len: int, bos_id) -> dict:
  """KTO's mismatched pairs: row i = completion of example i after the prompt of the next one.

  "Next" cycles over the valid examples of the batch (i + 1 mod S when the batch is full), so a
  partial batch never pairs a completion with a padding slot's missing prompt.
  """
  out = empty_token_arrays(len(examples), max_len)
  valid = [i for i, e in enumerate(examples) if e is not None]
  for k, i in enumerate(valid):
    seq = examples[i][0]
    nxt = examples[valid[(k + 1) % len(valid)]][0]
    mm = _fit_pair(nxt.ids[:nxt.prompt_len], seq.ids[seq.prompt_len:], seq.mask[seq.prompt_len:],
                   max_len, bos_id)
    place(out, mm, i, 0, 1, i)
  return {"mismatch_" + k: v for k, v in out.items()}


def unpaired_batch(examples: list, labels: list, max_len: int, bos_id, example_ids=None) -> dict:
  out = unpacked_batch(examples, max_len, example_ids=example_ids)
  out["label"] = np.asarray([float(l) if l is not None else 0.0 for l in labels], np.float32)
  out.update(mismatch_arrays(examples, max_len, bos_id))
  return out


def rl_batch(examples: list, rows: list, prompt_len: int, padding: str) -> dict:
  """Prompt batch for online RL: ids left- (generation) or right-padded to a static width."""
  n = len(examples)
  tokens = np.zeros((n, prompt_len), np.int32)
  lengths = np.zeros(n, np.int32)
  valid = np.zeros(n, np.float32)
  for i, example in enumerate(examples):
    if example is None:
      continue
    ids = example[0].ids
    lengths[i], valid[i] = len(ids), 1.0
    if padding == "left":
      tokens[i, prompt_len - len(ids):] = ids
    else:
      tokens[i, :len(ids)] = ids
  return {"prompt_tokens": tokens, "prompt_lengths": lengths, "example_valid": valid,
          "rows": list(rows)}


class FirstFitPacker:
  """Fills one batch of `rows` x `max_len` tokens with at most `slots` sequences, first fit.

  Each example goes whole or not at all: both sequences of a pair land in this batch (in any rows)
  as slots 2p and 2p + 1, so the pair stays addressable through `seq_index`. `add` returns False
  when the example does not fit; the caller then emits the batch and starts the next with it.
  """

  def __init__(self, rows: int, max_len: int, slots: int):
    self.rows, self.max_len, self.slots = rows, max_len, slots
    self.fill = [0] * rows
    self.segments = [0] * rows
    self.used = 0
    self.arrays = empty_token_arrays(rows, max_len)
    self.example_ids = np.full(slots, -1, np.int32)

  @property
  def empty(self) -> bool:
    return self.used == 0

  def add(self, example: list, example_id: int = -1) -> bool:
    """Places `example` (its sequences) if it fits; `example_id`: its dataset index."""
    if self.used + len(example) > self.slots:
      return False
    fill = list(self.fill)
    where = []
    for seq in example:
      row = next((r for r in range(self.rows) if fill[r] + len(seq.ids) <= self.max_len), None)
      if row is None:
        return False
      where.append((row, fill[row]))
      fill[row] += len(seq.ids)
    for seq, (row, start) in zip(example, where):
      self.segments[row] += 1
      place(self.arrays, seq, row, start, self.segments[row], self.used)
      self.example_ids[self.used] = example_id
      self.used += 1
    self.fill = fill
    return True

  def batch(self) -> dict:
    valid = np.zeros(self.slots, np.float32)
    valid[:self.used] = 1.0
    return dict(self.arrays, example_valid=valid, example_id=self.example_ids.copy())
