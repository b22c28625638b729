"""Every source format yields the same rows with `path:N` provenance; the built-in task's splits."""
import json

import numpy as np
import pytest

from jpost.data import DataError, builtin, make_tokenizer, prepare
from jpost.data.sources import iter_rows, parse_spec

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6)]]
MESSAGES = [{"messages": [{"role": "user", "content": "1+1="},
                          {"role": "assistant", "content": "2"}]}]


def _rows(spec, kind="sft", **kw):
  return [(where, row) for where, row in iter_rows(spec, kind, **kw)]


def _write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def _write_arrayrecord(path, records):
  from array_record.python import array_record_module
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r if isinstance(r, bytes) else json.dumps(r).encode())
  writer.close()
  return str(path)


def test_jsonl_parquet_arrayrecord_give_the_same_rows(tmp_path, write_jsonl):
  jsonl = write_jsonl(ROWS)
  parquet = _write_parquet(tmp_path / "d.parquet", ROWS)
  ar = _write_arrayrecord(tmp_path / "d.array_record", ROWS)
  for spec in (jsonl, f"jsonl:{tmp_path}/*.jsonl", parquet, f"parquet:{tmp_path}/*.parquet",
               f"arrayrecord:{ar}"):
    got = _rows(spec)
    assert [r for _, r in got] == ROWS, spec
    assert [w.rsplit(":", 1)[1] for w, _ in got] == ["1", "2", "3"]
  # Conversational rows survive Parquet's list-of-struct columns.
  parquet = _write_parquet(tmp_path / "m.parquet", MESSAGES)
  assert [r for _, r in _rows(parquet)] == MESSAGES


def test_bad_records_are_reported_with_their_index(tmp_path, make_cfg):
  ar = _write_arrayrecord(tmp_path / "bad.array_record", [ROWS[0], b"{oops", ROWS[1]])
  parquet = _write_parquet(tmp_path / "bad.parquet", [ROWS[0], {"prompt": "2+2=",
                                                                "completion": None}])
  cfg = make_cfg()
  with pytest.raises(DataError, match=rf"{ar}:2: invalid JSON: Expecting property name"):
    prepare(cfg, f"arrayrecord:{ar}", "sft", make_tokenizer(cfg), verbose=False)
  # A null (Parquet's missing value) counts as an absent field.
  with pytest.raises(DataError, match=rf"{parquet}:2: missing field 'completion' "
                     r"\(fields found: 'prompt'\)"):
    prepare(cfg, parquet, "sft", make_tokenizer(cfg), verbose=False)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  import tensorflow_datasets as tfds

  class JpostTestTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "prompt": tfds.features.Text(), "completion": tfds.features.Text(),
          "label": tfds.features.Scalar(dtype=np.bool_),
          "messages": tfds.features.Sequence({"role": tfds.features.Text(),
                                              "content": tfds.features.Text()})}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(ROWS),
              "test": self._generate_examples(ROWS[:1])}

    def _generate_examples(self, rows):
      for i, r in enumerate(rows):
        yield i, dict(r, label=i % 2 == 0, messages=[
            {"role": "user", "content": r["prompt"]},
            {"role": "assistant", "content": r["completion"]}])

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JpostTestTiny(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_data_source(tfds_dir, make_cfg):
  got = _rows("tfds:jpost_test_tiny", "unpaired", tfds_data_dir=tfds_dir)
  assert [w for w, _ in got] == [f"tfds:jpost_test_tiny:train:{i}" for i in (1, 2, 3)]
  # bytes -> str, numpy bool -> bool, Sequence({role, content}) -> a list of messages.
  for (_, row), want, i in zip(got, ROWS, range(3)):
    assert {k: row[k] for k in ("prompt", "completion")} == want
    assert row["label"] is (i % 2 == 0)
    assert row["messages"] == [{"role": "user", "content": want["prompt"]},
                               {"role": "assistant", "content": want["completion"]}]
  assert len(_rows("tfds:jpost_test_tiny:1.0.0:test", tfds_data_dir=tfds_dir)) == 1
  cfg = make_cfg(tfds_data_dir=tfds_dir)
  store = prepare(cfg, "tfds:jpost_test_tiny:train", "unpaired", make_tokenizer(cfg),
                  verbose=False)
  assert len(store) == 3 and store.labels.tolist() == [True, False, True]


def test_spec_parsing():
  assert parse_spec("a/b.jsonl") == ("jsonl", "a/b.jsonl")
  assert parse_spec("x.parquet") == ("parquet", "x.parquet")
  assert parse_spec("arrayrecord:/d/*") == ("arrayrecord", "/d/*")
  assert parse_spec("tfds:mnist:test") == ("tfds", "mnist:test")
  with pytest.raises(ValueError, match="cannot tell the format"):
    parse_spec("data.csv")
  with pytest.raises(FileNotFoundError, match="no file matches"):
    _rows("/nonexistent/*.jsonl")


def _solve(prompt):
  """'27+5=' -> 32, parsed explicitly (no eval)."""
  expr = prompt[:-1]
  op = "+" if "+" in expr else "-"
  a, b = (int(x) for x in expr.rsplit(op, 1))
  return a + b if op == "+" else a - b


def test_builtin_arithmetic_splits_and_schemas(make_cfg):
  train, heldout = builtin.arithmetic_split("train"), builtin.arithmetic_split("heldout")
  assert len(train) == 1800 and len(heldout) == 200 and not set(train) & set(heldout)
  assert builtin.arithmetic_split("train") == train   # deterministic
  # Held-out problems are learnable: each units-digit fact is trained with another tens digit.
  assert all(any((10 * k + a % 10, op, b) in set(train) for k in range(10))
             for a, op, b in heldout)
  sft = builtin.rows("arithmetic", "heldout", "sft")
  assert all(_solve(r["prompt"]) == int(r["completion"]) for r in sft)
  pairs = builtin.rows("arithmetic", "train", "pairwise")
  # Near misses are off in the tens digit (by 10 or 20), in both directions.
  offsets = {int(p["rejected"]) - int(p["chosen"]) for p in pairs}
  assert offsets == {10, -10, 20, -20}
  unpaired = builtin.rows("arithmetic", "train", "unpaired")
  assert sum(r["label"] for r in unpaired) * 2 == len(unpaired) == 3600
  assert all((_solve(r["prompt"]) == int(r["completion"])) == r["label"] for r in unpaired)
  rl = builtin.rows("arithmetic", "train", "rl")
  assert rl[0].keys() == {"prompt", "answer", "demonstration"}
  # Every kind passes validation, and sequences are short enough for a tiny model.
  cfg = make_cfg(max_len=16)
  for kind in ("sft", "pairwise", "unpaired", "rl"):
    store = prepare(cfg, "builtin:arithmetic:train", kind, make_tokenizer(cfg), verbose=False)
    assert store.summary["dropped"] == {} and store.summary["truncated"] == 0
    assert np.diff(store.offsets).max() <= 10
