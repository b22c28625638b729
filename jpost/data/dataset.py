"""The validation pass: read every row once, validate, encode, count, and keep the encoded copy.

Every row is checked before training starts (a bad row at 90% of an epoch must not stop a run
hours in), so all bad rows are reported together as `path:N: reason`. Over-length rows follow
`data.overlong` and are counted (truncated, or dropped as 'overlong'); they are never errors.
The kept examples are stored as flat numpy arrays (ids, masks, offsets), which is the random-access
source the grain pipeline shuffles and batches: no file is read, and no row re-tokenised, again.
Every process runs the same pass, so all agree on the kept set and shard it consistently.
"""
import collections
import dataclasses
import logging

import numpy as np

from jpost.data import schema, sources
from jpost.data.encode import Encoder, Seq
from jpost.data.schema import DataError, RowError

log = logging.getLogger(__name__)
MAX_REPORTED = 20   # bad rows listed in an error or warning; the summary counts all of them


@dataclasses.dataclass
class EncodedDataset:
  """Kept examples of one source, encoded. Example i is sequences [first[i], first[i] + per)."""
  kind: str
  per: int                 # sequences per example: 2 for pairs, else 1
  ids: np.ndarray          # int32, all sequences concatenated
  mask: np.ndarray         # int8, same length
  offsets: np.ndarray      # int64 [num_seqs + 1]
  prompt_lens: np.ndarray  # int32 [num_seqs]
  labels: np.ndarray       # bool [N] (unpaired), else empty
  rows: list               # RL: the validated rows (answers, references, ...) with 'where'
  summary: dict

  def __len__(self) -> int:
    return (len(self.offsets) - 1) // self.per

  def seq(self, j: int) -> Seq:
    a, b = self.offsets[j], self.offsets[j + 1]
    return Seq(self.ids[a:b], self.mask[a:b], int(self.prompt_lens[j]))

  def example(self, i: int) -> list[Seq]:
    return [self.seq(i * self.per + k) for k in range(self.per)]


def summary_line(s: dict) -> str:
  dropped = sum(s["dropped"].values())
  reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["dropped"].items()))
  return (f"data {s['source']} ({s['kind']}): {s['rows']} rows, kept {s['kept']}, truncated "
          f"{s['truncated']}, dropped {dropped}" + (f" ({reasons})" if reasons else ""))


def prepare(data_cfg, spec: str, kind: str, tokenizer, *, verbose: bool = True) -> EncodedDataset:
  encoder = Encoder(tokenizer, kind=kind, chat_template=data_cfg.chat_template,
                    loss_on=data_cfg.loss_on, max_len=data_cfg.max_len,
                    overlong=data_cfg.overlong, max_prompt_len=data_cfg.max_prompt_len)
  ids, masks, lens, prompt_lens, labels, rows = [], [], [], [], [], []
  dropped = collections.Counter()
  errors = []
  n_rows = n_truncated = 0
  for where, row in sources.iter_rows(spec, kind, tfds_data_dir=data_cfg.tfds_data_dir):
    n_rows += 1
    try:
      if isinstance(row, RowError):
        raise row
      norm = schema.validate(row, kind)
      seqs, truncated = encoder.encode(norm)
    except RowError as e:
      dropped[e.reason] += 1
      if e.reason != "overlong":
        errors.append(f"{where}: {e}")
      continue
    n_truncated += truncated
    for s in seqs:
      ids.append(s.ids)
      masks.append(s.mask)
      lens.append(len(s.ids))
      prompt_lens.append(s.prompt_len)
    if kind == "unpaired":
      labels.append(norm["label"])
    if kind == "rl":
      rows.append(dict(norm, where=where))

  per = 2 if kind == "pairwise" else 1
  summary = {"source": spec, "kind": kind, "rows": n_rows, "kept": len(lens) // per,
             "truncated": n_truncated, "dropped": dict(dropped)}
  shown = "\n  ".join(errors[:MAX_REPORTED])
  more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
  if errors and data_cfg.on_error == "raise":
    raise DataError(f"{len(errors)} invalid row(s) in {spec} (data.on_error='raise'; set "
                    f"'drop' to skip them):\n  {shown}{more}\n{summary_line(summary)}")
  if summary["kept"] == 0:
    raise DataError(f"no usable rows in {spec}: every row was dropped\n{summary_line(summary)}"
                    + (f"\n  {shown}{more}" if errors else ""))
  if errors:
    log.warning("dropped %d invalid row(s) in %s (data.on_error='drop'):\n  %s%s",
                len(errors), spec, shown, more)
  if verbose:
    print(summary_line(summary), flush=True)
  empty = np.zeros(0)
  return EncodedDataset(
      kind=kind, per=per,
      ids=np.concatenate(ids).astype(np.int32), mask=np.concatenate(masks).astype(np.int8),
      offsets=np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
      prompt_lens=np.asarray(prompt_lens, np.int32),
      labels=np.asarray(labels, bool) if labels else empty.astype(bool), rows=rows,
      summary=summary)
