"""Row schemas (TRL's column names) and the validation every row goes through.

  sft       `messages` | `prompt` + `completion` | `text`   (or `prompt` + `chosen`: the chosen
            side of preference data, which is what a DPO recipe's SFT warm start trains on)
  pairwise  `prompt` + `chosen` + `rejected`
  unpaired  `prompt` + `completion` + `label` (bool: desirable / undesirable)
  rl        `prompt` (+ optional `answer`, `references`, `demonstration`)

Text fields are strings or conversational lists of {role, content} messages; within one row they
are all one or the other. A field whose value is null counts as absent (Parquet fills missing
columns with nulls). `validate` returns the row reduced to its schema fields, or raises RowError
with a reason code (counted in the summary) and a message naming the field.
"""


class RowError(ValueError):
  """One bad row. `reason` is a short code for the summary's per-reason counts."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class DataError(ValueError):
  """A dataset-level failure (bad rows under on_error='raise', or nothing left to train on)."""


def _missing(row, names):
  found = ", ".join(repr(k) for k in sorted(row)) or "none"
  what = " + ".join(repr(n) for n in names)
  plural = "s" if len(names) > 1 else ""
  return RowError("missing_field", f"missing field{plural} {what} (fields found: {found})")


def _type_name(value) -> str:
  return "null" if value is None else type(value).__name__


def _messages(value, name: str) -> list[dict]:
  if not value:
    raise RowError("empty_field", f"{name!r} is an empty message list")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise RowError("wrong_type", f"{name}[{i}] must be a {{role, content}} object, got "
                     f"{_type_name(m)}")
    for key in ("role", "content"):
      if m.get(key) is None:
        found = ", ".join(repr(k) for k in sorted(m)) or "none"
        raise RowError("missing_field", f"{name}[{i}] has no {key!r} (fields found: {found})")
      if not isinstance(m[key], str):
        raise RowError("wrong_type", f"{name}[{i}].{key} must be a string, got "
                       f"{_type_name(m[key])}")
    out.append({k: v for k, v in m.items() if v is not None})
  return out


def _text_or_messages(row, name: str, *, allow_empty: bool = False):
  value = row[name]
  if isinstance(value, str):
    if not allow_empty and not value.strip():
      raise RowError("empty_field", f"empty {name!r}")
    return value
  if isinstance(value, list):
    msgs = _messages(value, name)
    if not allow_empty and not any(m["content"].strip() for m in msgs):
      raise RowError("empty_field", f"empty {name!r} (every message has empty content)")
    return msgs
  raise RowError("wrong_type", f"{name!r} must be a string or a list of {{role, content}} "
                 f"messages, got {_type_name(value)}")


def _same_style(row, names):
  """All text fields of a row are strings, or all are message lists."""
  styles = {n: isinstance(row[n], list) for n in names}
  if len(set(styles.values())) > 1:
    lists = [n for n, s in styles.items() if s]
    strs = [n for n, s in styles.items() if not s]
    is_list = "is a message list" if len(lists) == 1 else "are message lists"
    is_str = "is a string" if len(strs) == 1 else "are strings"
    raise RowError("wrong_type", f"{', '.join(map(repr, lists))} {is_list} but "
                   f"{', '.join(map(repr, strs))} {is_str}; use one style per row")


def _require(row, names):
  if any(n not in row for n in names):
    raise _missing(row, [n for n in names if n not in row])


def validate(row: dict, kind: str) -> dict:
  row = {k: v for k, v in row.items() if v is not None}
  if kind == "sft":
    return _sft(row)
  if kind == "pairwise":
    _require(row, ["prompt", "chosen", "rejected"])
    out = {"prompt": _text_or_messages(row, "prompt", allow_empty=True),
           "chosen": _text_or_messages(row, "chosen"),
           "rejected": _text_or_messages(row, "rejected")}
    _same_style(out, ["prompt", "chosen", "rejected"])
    if out["chosen"] == out["rejected"]:
      raise RowError("chosen_equals_rejected", "'chosen' and 'rejected' are identical")
    return out
  if kind == "unpaired":
    _require(row, ["prompt", "completion", "label"])
    out = {"prompt": _text_or_messages(row, "prompt", allow_empty=True),
           "completion": _text_or_messages(row, "completion")}
    _same_style(out, ["prompt", "completion"])
    if not isinstance(row["label"], bool):
      raise RowError("wrong_type", f"'label' must be a boolean (true = desirable), got "
                     f"{_type_name(row['label'])} {row['label']!r}")
    out["label"] = row["label"]
    return out
  if kind == "rl":
    return _rl(row)
  raise ValueError(f"unknown data kind {kind!r}")


def _sft(row):
  if "messages" in row:
    if not isinstance(row["messages"], list):
      raise RowError("wrong_type", f"'messages' must be a list of {{role, content}} messages, "
                     f"got {_type_name(row['messages'])}")
    return {"messages": _messages(row["messages"], "messages")}
  if "prompt" in row and ("completion" in row or "chosen" in row):
    name = "completion" if "completion" in row else "chosen"
    out = {"prompt": _text_or_messages(row, "prompt", allow_empty=True),
           "completion": _text_or_messages(row, name)}
    _same_style(out, ["prompt", "completion"])
    return out
  if "text" in row:
    if not isinstance(row["text"], str):
      raise RowError("wrong_type", f"'text' must be a string, got {_type_name(row['text'])}")
    if not row["text"].strip():
      raise RowError("empty_field", "empty 'text'")
    return {"text": row["text"]}
  if "prompt" in row:
    raise _missing(row, ["completion"])
  found = ", ".join(repr(k) for k in sorted(row)) or "none"
  raise RowError("missing_field", "missing field: SFT rows need 'messages', 'prompt' + "
                 f"'completion' or 'text' (fields found: {found})")


def _rl(row):
  _require(row, ["prompt"])
  out = {"prompt": _text_or_messages(row, "prompt")}
  if "answer" in row:
    if not isinstance(row["answer"], (str, int, float)) or isinstance(row["answer"], bool):
      raise RowError("wrong_type", f"'answer' must be a string or a number, got "
                     f"{_type_name(row['answer'])}")
    out["answer"] = row["answer"]
  if "references" in row:
    refs = row["references"]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
      raise RowError("wrong_type", "'references' must be a string or a list of strings")
    out["references"] = refs
  if "demonstration" in row:
    out["demonstration"] = _text_or_messages(row, "demonstration")
    _same_style(out, ["prompt", "demonstration"])
  return out
