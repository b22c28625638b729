"""Row validation, error messages (`path:line: reason`), the summary, and the over-length policy."""
import re

import numpy as np
import pytest

from jpost.data import DataError, RowError, make_tokenizer, prepare
from jpost.data.encode import Encoder
from jpost.data.tokenizer import ByteTokenizer

GOOD = {"prompt": "1+1=", "completion": "2"}


def _prepare(make_cfg, path, kind="sft", **overrides):
  cfg = make_cfg(**overrides)
  return prepare(cfg, path, kind, make_tokenizer(cfg), verbose=False)


def test_every_bad_row_is_reported_with_file_line_and_reason(make_cfg, write_jsonl):
  path = write_jsonl([
      GOOD,
      '{"prompt": "1+2=", "completion": "3"',            # line 2: unterminated object
      {"prompt": "2+2="},                                # line 3: no completion
      "",                                                # line 4: blank (skipped)
      {"prompt": "2+3=", "completion": "   "},           # line 5: empty completion
      {"prompt": 7, "completion": "8"},                  # line 6: wrong type
      "[1, 2]",                                          # line 7: not an object
      GOOD,
  ])
  with pytest.raises(DataError) as e:
    _prepare(make_cfg, path)
  msg = str(e.value)
  assert "5 invalid row(s)" in msg
  assert re.search(rf"{re.escape(path)}:2: invalid JSON: Expecting ',' delimiter", msg)
  assert f"{path}:3: missing field 'completion' (fields found: 'prompt')" in msg
  assert f"{path}:5: empty 'completion'" in msg
  assert f"{path}:6: 'prompt' must be a string or a list of {{role, content}} messages, got int" \
      in msg
  assert f"{path}:7: expected a JSON object, got list" in msg
  assert f"{path}:4:" not in msg and f"{path}:1:" not in msg and f"{path}:8:" not in msg


def test_drop_policy_keeps_the_good_rows_and_counts_reasons(make_cfg, write_jsonl):
  path = write_jsonl([GOOD, "{bad json", {"text": ""}, GOOD, {"answer": 3}])
  store = _prepare(make_cfg, path, on_error="drop")
  assert len(store) == 2
  assert store.summary == {"source": path, "kind": "sft", "rows": 5, "kept": 2, "truncated": 0,
                           "dropped": {"invalid_json": 1, "empty_field": 1, "missing_field": 1}}


def test_missing_field_lists_the_fields_found(make_cfg, write_jsonl):
  path = write_jsonl([{"question": "1+1=", "response": "2"}])
  with pytest.raises(DataError, match=re.escape(
      f"{path}:1: missing field: SFT rows need 'messages', 'prompt' + 'completion' or 'text' "
      "(fields found: 'question', 'response')")):
    _prepare(make_cfg, path)
  path = write_jsonl([{"prompt": "1+1=", "chosen": "2"}], name="pairs.jsonl")
  with pytest.raises(DataError, match=re.escape(
      f"{path}:1: missing field 'rejected' (fields found: 'chosen', 'prompt')")):
    _prepare(make_cfg, path, kind="pairwise")


@pytest.mark.parametrize("kind,row,reason", [
    ("pairwise", {"prompt": "1+1=", "chosen": "2", "rejected": "2"},
     "'chosen' and 'rejected' are identical"),
    ("pairwise", {"prompt": "1+1=", "chosen": [{"role": "assistant", "content": "2"}],
                  "rejected": "3"},
     "'chosen' is a message list but 'prompt', 'rejected' are strings"),
    ("unpaired", {"prompt": "1+1=", "completion": "2", "label": "yes"},
     "'label' must be a boolean (true = desirable), got str 'yes'"),
    ("sft", {"messages": [{"role": "user"}]},
     "messages[0] has no 'content' (fields found: 'role')"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]},
     "'messages' does not end with an assistant turn"),
    ("rl", {"prompt": ""}, "empty 'prompt'"),
    ("rl", {"prompt": "1+1=", "answer": [2]}, "'answer' must be a string or a number, got list"),
])
def test_row_errors_name_the_field(make_cfg, write_jsonl, kind, row, reason):
  path = write_jsonl([row])
  with pytest.raises(DataError) as e:
    _prepare(make_cfg, path, kind=kind)
  assert f"{path}:1: {reason}" in str(e.value)


def test_all_dropped_dataset_is_an_error(make_cfg, write_jsonl):
  path = write_jsonl([{"prompt": "1+1=", "completion": ""}, "nope"])
  with pytest.raises(DataError, match="no usable rows") as e:
    _prepare(make_cfg, path, on_error="drop")
  assert f"{path}:2: invalid JSON" in str(e.value)
  # Over-length drops are policy, not errors, but dropping everything is still an error.
  path = write_jsonl([{"prompt": "1+1=" * 20, "completion": "2"}], name="long.jsonl")
  with pytest.raises(DataError, match=r"dropped 1 \(overlong 1\)"):
    _prepare(make_cfg, path, max_len=16, overlong="drop")


def test_overlong_policies_are_counted(make_cfg, write_jsonl):
  rows = [GOOD, {"prompt": "9" * 10 + "+1=", "completion": "xyz"},    # 18 tokens: long prompt
          {"prompt": "1+1=", "completion": "y" * 30},                 # long completion
          {"prompt": "9" * 20 + "+1=", "completion": "x"}]            # prompt alone > max_len
  path = write_jsonl(rows)
  counts = {}
  for policy in ("truncate_left", "truncate_right", "drop"):
    s = _prepare(make_cfg, path, max_len=16, overlong=policy).summary
    counts[policy] = (s["kept"], s["truncated"], s["dropped"])
  # truncate_left cuts only the prompt: the long completion cannot be kept.
  assert counts["truncate_left"] == (3, 2, {"overlong": 1})
  # truncate_right cuts the end: a prompt longer than max_len leaves nothing to train on.
  assert counts["truncate_right"] == (3, 2, {"overlong": 1})
  assert counts["drop"] == (1, 0, {"overlong": 3})


def _enc(policy, kind="sft", max_len=8):
  return Encoder(ByteTokenizer(), kind=kind, chat_template=False, loss_on="completion",
                 max_len=max_len, overlong=policy)


def test_truncate_left_keeps_bos_and_the_whole_completion():
  tok = ByteTokenizer()
  (seq,), truncated = _enc("truncate_left").encode({"prompt": "abcdefg", "completion": "XY"})
  assert truncated and len(seq.ids) == 8
  assert tok.decode(seq.ids, skip_special_tokens=False) == "<s>defgXY</s>"
  assert tok.decode(seq.ids[seq.mask == 1], False) == "XY</s>"
  assert seq.prompt_len == 5
  (seq,), _ = _enc("truncate_right").encode({"prompt": "abcdef", "completion": "XY"})
  assert tok.decode(seq.ids, skip_special_tokens=False) == "<s>abcdefX"
  assert tok.decode(seq.ids[seq.mask == 1], False) == "X"
  # Nothing trained is left after cutting the right end: the row is dropped as overlong.
  with pytest.raises(RowError, match="no trained token is left") as e:
    _enc("truncate_right").encode({"prompt": "abcdefg", "completion": "XY"})
  assert e.value.reason == "overlong"


def test_truncate_left_cuts_both_sides_of_a_pair_alike():
  tok = ByteTokenizer()
  (c, r), truncated = _enc("truncate_left", kind="pairwise").encode(
      {"prompt": "abcdefg", "chosen": "XYZ", "rejected": "Q"})
  assert truncated
  assert tok.decode(c.ids, False) == "<s>efgXYZ</s>"
  assert tok.decode(r.ids, False) == "<s>efgQ</s>"   # same prompt, though it alone would fit
  np.testing.assert_array_equal(c.ids[:c.prompt_len], r.ids[:r.prompt_len])


def test_text_rows_train_on_every_token_and_truncate_from_the_start():
  tok = ByteTokenizer()
  (seq,), truncated = _enc("truncate_left").encode({"text": "abcdefghij"})
  assert truncated and tok.decode(seq.ids, False) == "<s>efghij</s>"
  assert seq.mask.tolist() == [0] + [1] * 7
