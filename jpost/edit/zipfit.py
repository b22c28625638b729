"""ZIP-FIT data selection (ALGORITHMS.md §7): keep the candidates that compress best with a target.

ZIP-FIT ("ZIP-FIT: Embedding-Free Data Selection via Compression-Based Alignment", Obbad et al.;
github.com/stair-lab/ZIP-FIT) scores a candidate x against target rows y_1..y_n with the gzip
normalised compression distance

    NCD(x, y) = (C(x + y) - min(C(x), C(y))) / max(C(x), C(y)),   C = gzip-compressed length,

and ranks candidates by their alignment  A(x) = mean_j (1 - NCD(x, y_j)) = 1 - mean_j NCD(x, y_j),
higher is better (text that shares the target's patterns compresses better next to it). The top
k by alignment are kept. The concatenation is candidate then target, without a separator, as in
the reference implementation; gzip level 9 here (the reference defaults to 0, stored blocks,
under which every NCD is about 1).

Cost: one gzip of every (candidate, target) pair; `score_candidates` spreads the candidates over
worker processes. This module needs neither JAX nor the data pipeline (cheap worker start-up).
"""
import concurrent.futures
import gzip
import json
import multiprocessing
import os

import numpy as np

DEFAULT_LEVEL = 9
FIELDS = ("auto", "text", "prompt+completion", "messages")


# ------------------------------------------------------------------------------------------- NCD

def compressed_size(text: str, level: int = DEFAULT_LEVEL) -> int:
  """C(x): gzip length of the UTF-8 bytes (mtime 0: the output does not depend on the clock)."""
  return len(gzip.compress(text.encode("utf-8"), compresslevel=level, mtime=0))


def ncd(x: str, y: str, cx: int | None = None, cy: int | None = None,
        level: int = DEFAULT_LEVEL) -> float:
  """Normalised compression distance; cx / cy: precomputed C(x) / C(y)."""
  cx = compressed_size(x, level) if cx is None else cx
  cy = compressed_size(y, level) if cy is None else cy
  return (compressed_size(x + y, level) - min(cx, cy)) / max(cx, cy)


def alignment(x: str, targets, target_sizes, level: int = DEFAULT_LEVEL) -> float:
  """1 - mean NCD(x, y) over the targets (ZIP-FIT's alignment; higher is closer)."""
  cx = compressed_size(x, level)
  return 1.0 - float(np.mean([ncd(x, y, cx, cy, level) for y, cy in zip(targets, target_sizes)]))


# Per-worker copy of the target set, sent once at pool start rather than with every task.
_TARGETS = None


def _init_worker(targets, target_sizes, level):
  global _TARGETS
  _TARGETS = (targets, target_sizes, level)


def _score_chunk(chunk):
  targets, sizes, level = _TARGETS
  return [alignment(x, targets, sizes, level) for x in chunk]


def score_candidates(candidates, targets, *, workers: int = 1, level: int = DEFAULT_LEVEL,
                     chunk_size: int = 64) -> np.ndarray:
  """Alignment of every candidate to the target set -> [N] float64 (input order).

  workers > 1: a process pool (gzip holds the GIL for small inputs, so threads would not help).
  The workers are spawned, not forked: a parent that imported JAX is multithreaded.
  """
  if not targets:
    raise ValueError("score_candidates: the target set is empty")
  target_sizes = [compressed_size(y, level) for y in targets]
  if workers <= 1 or len(candidates) <= chunk_size:
    _init_worker(targets, target_sizes, level)
    return np.asarray(_score_chunk(candidates), np.float64)
  chunks = [candidates[i:i + chunk_size] for i in range(0, len(candidates), chunk_size)]
  with concurrent.futures.ProcessPoolExecutor(
      min(workers, len(chunks)), mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(targets, target_sizes, level)) as pool:
    scores = [s for part in pool.map(_score_chunk, chunks) for s in part]
  return np.asarray(scores, np.float64)


def top_k(scores, k: int) -> np.ndarray:
  """Indices of the k highest scores, best first; ties keep the input order (stable)."""
  order = np.argsort(-np.asarray(scores), kind="stable")
  return order[:max(int(k), 0)]


# ------------------------------------------------------------------------------------------ rows

class RowTextError(ValueError):
  """A row with no text to score (the message names file:line and the fields)."""


def _content(value) -> str:
  """A text field: a string, or a list of {role, content} messages (contents joined)."""
  if isinstance(value, str):
    return value
  if isinstance(value, list) and all(isinstance(m, dict) for m in value):
    return "\n".join(str(m.get("content", "")) for m in value)
  raise TypeError(type(value).__name__)


def row_text(row: dict, field: str = "auto", where: str = "row") -> str:
  """The text a row is scored on.

  auto: `text`; else `prompt` + (`completion` | `chosen`); else the `messages` contents joined by
  newlines. `text` / `prompt+completion` / `messages` force one of them.
  """
  if field not in FIELDS:
    raise ValueError(f"field={field!r}: expected one of {FIELDS}")
  found = ", ".join(repr(k) for k in sorted(row)) or "none"
  try:
    if field in ("auto", "text") and row.get("text") is not None:
      return _content(row["text"])
    if field in ("auto", "prompt+completion") and row.get("prompt") is not None:
      answer = next((row[k] for k in ("completion", "chosen") if row.get(k) is not None), None)
      if answer is not None:
        return _content(row["prompt"]) + "\n" + _content(answer)
      if field == "prompt+completion":
        raise RowTextError(f"{where}: has 'prompt' but no 'completion' or 'chosen' "
                           f"(fields found: {found})")
    if field in ("auto", "messages") and row.get("messages") is not None:
      return _content(row["messages"])
  except TypeError as e:
    raise RowTextError(f"{where}: a text field is a {e}, expected a string or a list of "
                       "{role, content} messages") from None
  wanted = {"auto": "'text', 'prompt' + 'completion'/'chosen' or 'messages'",
            "text": "'text'", "prompt+completion": "'prompt' + 'completion'/'chosen'",
            "messages": "'messages'"}[field]
  raise RowTextError(f"{where}: no {wanted} to score (fields found: {found})")


def read_jsonl(path: str) -> list[tuple[int, str, dict]]:
  """-> [(line number, the line as read, row)]; blank lines are skipped; a line that is not a
  JSON object raises RowTextError naming path:line."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise RowTextError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") \
            from None
      if not isinstance(row, dict):
        raise RowTextError(f"{path}:{line_no}: expected a JSON object, got "
                           f"{type(row).__name__}")
      out.append((line_no, line.rstrip("\r\n"), row))
  return out


def read_texts(path: str, field: str = "auto"):
  """-> (rows [(line number, raw line, row)], texts) for a JSONL file."""
  rows = read_jsonl(path)
  return rows, [row_text(row, field, f"{path}:{n}") for n, _, row in rows]
