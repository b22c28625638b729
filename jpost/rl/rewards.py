"""Rewards (ALGORITHMS.md §6): each is `f(prompt_row, completion_text) -> float`, run on the host.

Built-ins: `math`, `exact_match`, `regex_format`, `bleu`; any other name is a user reward given as
a dotted path `package.module:function`, imported with importlib (never eval). `Scorer` runs the
rewards of a batch in a thread pool with a per-call timeout; an exception, a timeout or a
non-finite value is a `RewardError` that names the reward and shows the row: never a silent 0.
"""
import concurrent.futures
import functools
import importlib
import math
import re
import time
from typing import Callable, Sequence

import numpy as np


class RewardError(RuntimeError):
  """A reward raised, timed out or returned something that is not a finite number."""


# ---------------------------------------------------------------------------- answer extraction

def _boxed_contents(text):
  """(found, contents) of the last \\boxed{...} / \\fbox{...} (nested braces).

  An unbalanced box (a completion cut inside it) is found with contents None: the model did box
  an answer, it is unreadable, and falling back to the last number would reward a fragment.
  """
  starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
  if not starts:
    m = None
    for m in re.finditer(r"\\boxed\s+([^\s$]+)", text):   # "\boxed 5"
      pass
    return (True, m.group(1)) if m else (False, None)
  start = starts[-1]
  depth = 1
  for i in range(start, len(text)):
    if text[i] == "{":
      depth += 1
    elif text[i] == "}":
      depth -= 1
      if depth == 0:
        return True, text[start:i]
  return True, None


_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"


def extract_answer(text: str):
  """The final answer of a completion: the last \\boxed{}, else what follows the last
  "answer is", else the last number; None when there is none (or the last box is unbalanced)."""
  found_box, boxed = _boxed_contents(text)
  if found_box:
    return boxed.strip() if boxed is not None else None
  found = None
  for found in re.finditer(r"answer\s+is\s*:?\s*(.+)", text, flags=re.IGNORECASE):
    pass
  if found:
    answer = found.group(1).strip()
    answer = re.sub(r"[.\s]+$", "", answer)   # sentence-final period, not a decimal point
    if answer:
      return answer
  numbers = re.findall(_NUMBER, text)
  return numbers[-1] if numbers else None


def normalize_answer(s: str) -> str:
  """Canonical text of an answer: LaTeX wrappers, units of formatting, spaces and case removed."""
  s = str(s).strip()
  if "####" in s:                           # GSM8K gold answers: "... #### 72"
    s = s.split("####")[-1]
  s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
  s = re.sub(r"\\[dt]frac", r"\\frac", s)
  s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", s)
  s = re.sub(r"\\frac\s*(\d)(\d)", r"\1/\2", s)  # \frac12
  s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
  for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\%", "%", "$"):
    s = s.replace(token, "")
  s = re.sub(r"(\d),(?=\d{3}(?!\d))", r"\1", s)   # thousands separators
  s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)           # "x = 5" -> "5"
  s = re.sub(r"\s+", "", s).lower().rstrip(".")
  if len(s) > 1 and s[0] == "{" and s[-1] == "}":
    s = s[1:-1]
  return s


def _to_number(s: str):
  """A float for '3', '-2.5', '1/3', '(1)/(3)'; None otherwise."""
  m = re.fullmatch(r"\(?(-?\d+(?:\.\d+)?|-?\.\d+)\)?(?:/\(?(-?\d+(?:\.\d+)?)\)?)?", s)
  if not m:
    return None
  num = float(m.group(1))
  if m.group(2) is None:
    return num
  den = float(m.group(2))
  return num / den if den != 0 else None


def answers_match(predicted, gold, rel_tol=1e-6, abs_tol=1e-9) -> bool:
  """Normalised exact match, or numeric equality within tolerance."""
  if predicted is None:
    return False
  p, g = normalize_answer(predicted), normalize_answer(gold)
  if p == g:
    return True
  pn, gn = _to_number(p), _to_number(g)
  return pn is not None and gn is not None and math.isclose(pn, gn, rel_tol=rel_tol, abs_tol=abs_tol)


# ---------------------------------------------------------------------------------- built-ins

def math_reward(row, completion, *, correct=1.0, incorrect=0.0, rel_tol=1e-6):
  """1 / 0 by the extracted final answer vs `row['answer']`; Tulu 3 RLVR: correct=10."""
  ok = answers_match(extract_answer(completion), row["answer"], rel_tol=rel_tol)
  return correct if ok else incorrect


def exact_match(row, completion):
  """1 if the completion equals `row['answer']` up to surrounding and repeated whitespace."""
  squash = lambda s: " ".join(str(s).split())
  return float(squash(completion) == squash(row["answer"]))


THINK_ANSWER = r"<think>.*?</think>\s*<answer>.*?</answer>"


def regex_format(row, completion, *, pattern=THINK_ANSWER):
  """1 if the whole (stripped) completion matches `pattern` (dot matches newlines), else 0."""
  return float(re.fullmatch(pattern, completion.strip(), flags=re.DOTALL) is not None)


@functools.lru_cache(maxsize=1)
def _bleu_metric():
  from sacrebleu.metrics import BLEU
  # "Add-one" smoothing is Lin & Och (2004): +1 to matches and totals of n-gram orders n >= 2,
  # which sacrebleu calls add-k with k = 1 (Chen & Cherry's method 2). Effective order as for
  # any sentence-level BLEU, so short sentences are not zeroed by absent higher orders.
  return BLEU(tokenize="13a", smooth_method="add-k", smooth_value=1, max_ngram_order=4,
              effective_order=True)


def bleu(row, completion):
  """BLEUBERI: sentence BLEU in [0, 1] of the completion against `row['references']` (a list or
  one string; `row['reference']` also accepted); an empty completion scores 0."""
  refs = row["references"] if "references" in row else row["reference"]
  refs = [refs] if isinstance(refs, str) else list(refs)
  if not completion.strip():
    return 0.0
  return _bleu_metric().sentence_score(completion, refs).score / 100.0


def no_eos_penalty(scores, truncated, penalty=-10.0):
  """Tulu 3: completions cut at the length limit (no EOS) get `penalty` instead of their score."""
  return np.where(np.asarray(truncated, bool), penalty, np.asarray(scores, np.float32)).astype(
      np.float32)


BUILTIN = {"math": math_reward, "exact_match": exact_match, "regex_format": regex_format,
           "bleu": bleu}


def resolve(name: str) -> Callable:
  """A built-in reward by name, or a user reward `package.module:function` (importlib)."""
  if name in BUILTIN:
    return BUILTIN[name]
  if ":" not in name:
    raise ValueError(f"unknown reward {name!r}: built-ins are {sorted(BUILTIN)}; a user reward "
                     "is a dotted path 'package.module:function'")
  module_name, _, attr = name.partition(":")
  fn = importlib.import_module(module_name)
  for part in attr.split("."):
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(f"reward {name!r} is not callable")
  return fn


def make_reward(name: str, **kwargs) -> Callable:
  """The reward `name` with keyword arguments bound (e.g. make_reward('math', correct=10.0))."""
  fn = resolve(name)
  return functools.partial(fn, **kwargs) if kwargs else fn


# ------------------------------------------------------------------------------------- scoring

def _show(x, limit=400):
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Scorer:
  """Scores completions with weighted rewards, in parallel threads, each call under a timeout.

  rewards: (name, fn, weight) triples. `score` returns (total [N] float32, {name: [N] float32}).
  A reward that runs past `timeout_s` cannot be killed (it is a thread): its thread is abandoned
  and the call fails. The interpreter still joins that thread at exit, so a reward that never
  returns keeps the failed process alive: rewards that may hang must bound their own work.
  """

  def __init__(self, rewards: Sequence[tuple], *, max_workers=8, timeout_s=10.0):
    if not rewards:
      raise ValueError("Scorer needs at least one reward")
    self.rewards = [(name, fn, float(weight)) for name, fn, weight in rewards]
    names = [name for name, _, _ in self.rewards]
    if len(set(names)) != len(names):
      raise ValueError(f"Scorer: reward names must be unique, got {names}")
    self.max_workers = max_workers
    self.timeout_s = timeout_s

  @classmethod
  def from_specs(cls, specs, **kwargs):
    """specs: dicts {'name': ..., 'weight': 1.0, 'kwargs': {...}} (the config's list)."""
    rewards = [(s["name"], make_reward(s["name"], **s.get("kwargs", {})), s.get("weight", 1.0))
               for s in specs]
    return cls(rewards, **kwargs)

  def score(self, rows, completions, truncated=None, no_eos_penalty_value=None):
    if len(rows) != len(completions):
      raise ValueError(f"score: {len(rows)} rows but {len(completions)} completions")
    n = len(rows)
    per = {name: np.zeros(n, np.float32) for name, _, _ in self.rewards}
    tasks = [(name, fn, i) for name, fn, _ in self.rewards for i in range(n)]
    # When each call began (not when it was queued): the timeout is per call. A list slot
    # assignment is atomic, so the workers need no lock.
    started = [None] * len(tasks)

    def run(j):
      started[j] = time.monotonic()
      _, fn, i = tasks[j]
      return fn(rows[i], completions[i])

    def fail(j, why):
      name, _, i = tasks[j]
      return RewardError(f"reward {name!r} {why} on row {i}\n  prompt row: {_show(rows[i])}\n"
                         f"  completion: {_show(completions[i])}")

    pool = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="reward")
    try:
      futures = {pool.submit(run, j): j for j in range(len(tasks))}
      pending = set(futures)
      while pending:
        done, pending = concurrent.futures.wait(
            pending, timeout=min(0.05, self.timeout_s), return_when="FIRST_COMPLETED")
        for fut in done:
          j = futures[fut]
          try:
            value = fut.result()
          except Exception as e:   # shown with the row, never swallowed
            raise fail(j, f"raised {type(e).__name__}: {e}") from e
          try:
            value = float(value)
          except (TypeError, ValueError):
            raise fail(j, f"returned {value!r}, not a number") from None
          if not math.isfinite(value):
            raise fail(j, f"returned {value}")
          per[tasks[j][0]][tasks[j][2]] = value
        now = time.monotonic()
        for fut in pending:
          j = futures[fut]
          if started[j] is not None and now - started[j] > self.timeout_s:
            raise fail(j, f"timed out after {self.timeout_s} s")
    finally:
      # Never wait for a hung reward; queued calls are cancelled.
      pool.shutdown(wait=False, cancel_futures=True)

    total = np.zeros(n, np.float32)
    for name, _, weight in self.rewards:
      total += weight * per[name]
    if no_eos_penalty_value is not None:
      if truncated is None:
        raise ValueError("score: no_eos_penalty_value needs `truncated`")
      total = no_eos_penalty(total, truncated, no_eos_penalty_value)
    return total, per
