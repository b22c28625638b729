"""Built-in synthetic tasks, so every recipe has an embedded default that runs offline.

`builtin:arithmetic[:train|:heldout]`: a number 0-99 plus or minus a digit ("27+5=" -> "32",
"3-7=" -> "-4"), 2000 problems split 1800 / 200 by a fixed permutation, so the splits are disjoint
and identical on every machine. Every held-out problem combines a units-digit fact and a carry
pattern that training shows with other tens digits, so held-out accuracy measures generalisation
a tiny model can reach: a 2-layer d=64 byte-level transformer (PyTorch reference, AdamW 3e-3,
batch 32) reaches ~30% held-out exact match after 400 steps and ~70-75% after 800-1000. The
single-digit table alone (100 facts) is only memorised: the same model stays at ~15% on unseen
facts. With the byte tokenizer a sequence is at most 10 tokens.
One task serves every objective; the row schema follows the data kind:

  sft       {prompt, completion}
  pairwise  {prompt, chosen (correct), rejected (a near miss: tens digit off by 1 or 2)}
  unpaired  {prompt, completion, label}: each problem once correct (True), once wrong (False)
  rl        {prompt, answer, demonstration}
"""
import numpy as np

TASKS = ("arithmetic",)
SPLITS = ("train", "heldout")
_HELDOUT = 200
_SPLIT_SEED = 20261121   # fixed forever: changing it would move problems between the splits


def _problems():
  return [(a, op, b) for op in "+-" for a in range(100) for b in range(10)]


def _answer(a, op, b) -> int:
  return a + b if op == "+" else a - b


def _near_miss(a, op, b) -> int:
  # A plausible wrong answer: the tens digit is off (by 10 or 20, the direction varying between
  # problems so "the rejected answer is always the larger one" cannot be learnt). Tens errors are
  # what a preference signal can fix on *unseen* problems within a few hundred steps of a tiny
  # model (copying a's tens digit plus the carry); units-digit near misses (off by 1 or 2) need the
  # whole addition table and stay near chance on held-out pairs at that budget (measured).
  offset = (10, -10, 20, -20)[(7 * a + 3 * b + (op == "-")) % 4]
  return _answer(a, op, b) + offset


def arithmetic_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"builtin:arithmetic split {split!r}: expected one of {', '.join(SPLITS)}")
  problems = _problems()
  order = np.random.RandomState(_SPLIT_SEED).permutation(len(problems))
  chosen = order[:_HELDOUT] if split == "heldout" else order[_HELDOUT:]
  return [problems[i] for i in sorted(chosen)]


def arithmetic_rows(split: str, kind: str) -> list[dict]:
  rows = []
  for a, op, b in arithmetic_split(split):
    prompt, right, wrong = f"{a}{op}{b}=", str(_answer(a, op, b)), str(_near_miss(a, op, b))
    if kind == "sft":
      rows.append({"prompt": prompt, "completion": right})
    elif kind == "pairwise":
      rows.append({"prompt": prompt, "chosen": right, "rejected": wrong})
    elif kind == "unpaired":
      rows.append({"prompt": prompt, "completion": right, "label": True})
      rows.append({"prompt": prompt, "completion": wrong, "label": False})
    elif kind == "rl":
      rows.append({"prompt": prompt, "answer": right, "demonstration": right})
    else:
      raise ValueError(f"builtin:arithmetic has no rows for data kind {kind!r}")
  return rows


def rows(task: str, split: str, kind: str) -> list[dict]:
  if task == "arithmetic":
    return arithmetic_rows(split, kind)
  raise ValueError(f"builtin:{task}: unknown task (known: {', '.join(TASKS)})")
