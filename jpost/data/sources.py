"""Sources behind one spec string, each read once, in order, as `(where, row)` pairs.

Specs:
  path/to/file.jsonl, jsonl:GLOB      one JSON object per line (blank lines are skipped); also
                                      gs://... (etils.epath; a glob in the file name only)
  path/to/file.parquet, parquet:GLOB  Parquet (what HF `datasets` exports), read with pyarrow
  arrayrecord:GLOB                    ArrayRecord files whose records are JSON bytes (grain reader)
  tfds:NAME[:SPLIT]                   a prepared TFDS dataset via `tfds.data_source` (split: train)
  builtin:TASK[:SPLIT]                built-in synthetic tasks (jpost/data/builtin.py)

`where` is `path:N` with N the 1-based line (JSONL) or row / record index (other formats), so every
error message points at the offending row. A row is a plain dict of Python values, or a
`schema.RowError` when it cannot even be decoded (bad JSON, bad UTF-8), so the caller can report
every bad row instead of stopping at the first. The whole source is read once at start (validation
needs every row); training then reads the encoded copy (pipeline.py), never the files again.
"""
import glob
import json
import os
import re

import numpy as np

from jpost.data import builtin
from jpost.data.schema import RowError

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _expand(pattern: str) -> list[str]:
  if "://" in pattern:   # an object store (gs://...): the last path component may be a glob
    from etils import epath
    path = epath.Path(pattern)
    paths = (sorted(os.fspath(p) for p in path.parent.glob(path.name))
             if glob.has_magic(path.name) else [pattern] * path.exists())
  else:
    paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise FileNotFoundError(f"data source {pattern!r}: no file matches")
  return paths


def parse_spec(spec: str) -> tuple[str, str]:
  """'arrayrecord:/d/*.ar' -> ('arrayrecord', '/d/*.ar'); a bare path -> format from its suffix."""
  if not spec:
    raise ValueError("empty data source spec")
  for fmt in ("builtin", "tfds", "arrayrecord", "jsonl", "parquet"):
    if spec.startswith(fmt + ":"):
      return fmt, spec[len(fmt) + 1:]
  lower = spec.lower()
  if lower.endswith((".jsonl", ".json")):   # HF datasets' `to_json` writes JSON Lines
    return "jsonl", spec
  if lower.endswith(".parquet"):
    return "parquet", spec
  if lower.endswith((".array_record", ".arrayrecord")) or ".array_record-" in lower:
    return "arrayrecord", spec
  raise ValueError(f"data source {spec!r}: cannot tell the format; use a .jsonl / .parquet path "
                   "or a prefix jsonl: parquet: arrayrecord: tfds: builtin:")


def iter_rows(spec: str, kind: str, *, tfds_data_dir: str = ""):
  """Yields (where, row dict | RowError) for every row of the source, in file order."""
  fmt, arg = parse_spec(spec)
  if fmt == "jsonl":
    for path in _expand(arg):
      yield from _jsonl(path)
  elif fmt == "parquet":
    for path in _expand(arg):
      yield from _parquet(path)
  elif fmt == "arrayrecord":
    for path in _expand(arg):
      yield from _arrayrecord(path)
  elif fmt == "tfds":
    yield from _tfds(arg, tfds_data_dir)
  else:
    task, _, split = arg.partition(":")
    for i, row in enumerate(builtin.rows(task, split or "train", kind)):
      yield f"{spec}:{i + 1}", row


def _decode_json(data: bytes | str):
  try:
    text = data.decode("utf-8") if isinstance(data, bytes) else data
  except UnicodeDecodeError as e:
    raise RowError("invalid_utf8", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise RowError("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(row, dict):
    raise RowError("wrong_type", f"expected a JSON object, got {type(row).__name__}")
  return row


def _jsonl(path: str):
  if "://" in path:   # e.g. the online loop's filtered_prompts.jsonl in a gs:// workdir
    from etils import epath
    opened = epath.Path(path).open("rb")
  else:
    opened = open(path, "rb")
  with opened as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield f"{path}:{lineno}", _decode_json(line)
      except RowError as e:
        yield f"{path}:{lineno}", e


def _parquet(path: str):
  import pyarrow.parquet as pq   # only when a Parquet source is used
  n = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
    for row in batch.to_pylist():
      n += 1
      yield f"{path}:{n}", row


def _arrayrecord(path: str):
  import grain   # grain's reader handles the ArrayRecord index and chunking
  source = grain.sources.ArrayRecordDataSource([path])
  for i in range(len(source)):
    try:
      yield f"{path}:{i + 1}", _decode_json(source[i])
    except RowError as e:
      yield f"{path}:{i + 1}", e


def _tfds(arg: str, data_dir: str):
  import tensorflow_datasets as tfds   # slow import; only for tfds: sources
  name, split = arg, "train"
  head, sep, tail = arg.rpartition(":")
  if sep and not _VERSION.match(tail):   # 'name:1.0.0' is a version, 'name:1.0.0:test' a split
    name, split = head, tail
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  for i in range(len(source)):
    where = f"tfds:{name}:{split}:{i + 1}"
    try:
      yield where, {k: _from_numpy(v) for k, v in source[i].items()}
    except RowError as e:
      yield where, e


def _from_numpy(value):
  """TFDS values -> JSON-like Python: bytes -> str, arrays -> lists, Sequence(dict) -> messages."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RowError("invalid_utf8", f"not valid UTF-8 ({e.reason})") from None
  if isinstance(value, np.ndarray):
    return [_from_numpy(v) for v in value.tolist()] if value.ndim else _from_numpy(value.item())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_from_numpy(v) for v in value]
  if isinstance(value, dict):
    value = {k: _from_numpy(v) for k, v in value.items()}
    # tfds.features.Sequence({'role': Text(), 'content': Text()}) stores columns, not messages.
    cols = list(value.values())
    if value and all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1:
      return [dict(zip(value, items)) for items in zip(*cols)]
    return value
  return value
