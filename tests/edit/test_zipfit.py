"""ZIP-FIT: NCD properties, in-domain candidates rank first, row text extraction and its errors."""
import random

import numpy as np
import pytest

from jpost.edit import zipfit

PROSE = ["The old lighthouse keeper walked slowly along the cliffs every evening, watching the "
         "gulls wheel over the grey water.",
         "Rain fell softly on the market square while the merchants folded their awnings and "
         "hurried home for supper.",
         "She opened the letter carefully, afraid that the words inside would change everything "
         "she had planned for the summer.",
         "In the valley below, a river wound between orchards heavy with apples and fields of "
         "golden wheat.",
         "The committee postponed its decision until the spring, citing a lack of reliable "
         "information about the costs."]


def _arithmetic(seed, n):
  rng = random.Random(seed)
  lines = []
  for _ in range(n):
    a, b = rng.randint(10, 999), rng.randint(10, 999)
    lines.append(f"Q: What is {a} + {b}? A: {a} + {b} = {a + b}. The answer is {a + b}.")
  return lines


def test_ncd_properties():
  x, y = PROSE[0], _arithmetic(0, 1)[0]
  # Identical strings: the second copy costs almost nothing.
  assert zipfit.ncd(x, x) < 0.2
  assert zipfit.ncd(x, y) > 0.5
  assert zipfit.ncd(x, x) < zipfit.ncd(x, y)
  # Symmetric up to the compressor's order effects.
  for a, b in [(x, y), (PROSE[1], PROSE[2]), (y, _arithmetic(1, 1)[0])]:
    assert abs(zipfit.ncd(a, b) - zipfit.ncd(b, a)) < 0.1
  # Precomputed sizes give the same value; C is deterministic.
  cx, cy = zipfit.compressed_size(x), zipfit.compressed_size(y)
  assert zipfit.ncd(x, y, cx, cy) == zipfit.ncd(x, y)
  assert zipfit.compressed_size(x) == cx


def test_in_domain_candidates_rank_above_out_of_domain_ones():
  targets = _arithmetic(0, 8)
  in_domain = _arithmetic(1, 5)
  candidates = [c for pair in zip(PROSE, in_domain) for c in pair]   # interleaved
  scores = zipfit.score_candidates(candidates, targets)
  np.testing.assert_allclose(scores[0],
                             1 - np.mean([zipfit.ncd(candidates[0], t) for t in targets]))
  keep = zipfit.top_k(scores, 5)
  assert sorted(candidates[i] for i in keep) == sorted(in_domain)
  assert min(scores[1::2]) > max(scores[0::2])
  # Worker processes give the same scores.
  par = zipfit.score_candidates(candidates, targets, workers=2, chunk_size=3)
  np.testing.assert_array_equal(par, scores)


def test_top_k_is_stable_and_clipped():
  assert zipfit.top_k([0.1, 0.5, 0.5, 0.2], 3).tolist() == [1, 2, 3]
  assert zipfit.top_k([0.1, 0.2], 10).tolist() == [1, 0]


def test_row_text_fields_and_errors():
  assert zipfit.row_text({"text": "a", "prompt": "p"}) == "a"
  assert zipfit.row_text({"prompt": "p", "completion": "c"}) == "p\nc"
  assert zipfit.row_text({"prompt": "p", "chosen": "c", "rejected": "r"}) == "p\nc"
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
  assert zipfit.row_text({"messages": msgs}) == "hi\nyo"
  assert zipfit.row_text({"prompt": msgs[:1], "completion": msgs[1:]}) == "hi\nyo"
  assert zipfit.row_text({"text": "a", "messages": msgs}, "messages") == "hi\nyo"
  with pytest.raises(zipfit.RowTextError, match=r"f.jsonl:3: no 'text'.*fields found: 'prompt'"):
    zipfit.row_text({"prompt": "p"}, "auto", "f.jsonl:3")
  with pytest.raises(zipfit.RowTextError, match="has 'prompt' but no 'completion'"):
    zipfit.row_text({"prompt": "p"}, "prompt+completion", "f.jsonl:3")
  with pytest.raises(zipfit.RowTextError, match="a text field is a int"):
    zipfit.row_text({"text": 3}, "auto", "f.jsonl:3")


def test_bad_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "a"}\n\n{"text": "b",}\n')
  with pytest.raises(zipfit.RowTextError, match=f"{path}:3: invalid JSON"):
    zipfit.read_jsonl(str(path))
  path.write_text('{"text": "a"}\n["b"]\n')
  with pytest.raises(zipfit.RowTextError, match=f"{path}:2: expected a JSON object"):
    zipfit.read_jsonl(str(path))
  path.write_text('{"text": "a"}\n\n{"answer": "b"}\n')
  with pytest.raises(zipfit.RowTextError, match=f"{path}:3: no "):
    zipfit.read_texts(str(path))
