"""Rewards (ALGORITHMS.md §6): answer extraction, built-ins, user rewards and the threaded scorer."""
import importlib
import sys
import textwrap
import threading

import numpy as np
import pytest
import sacrebleu

from jpost.rl import rewards as R


@pytest.mark.parametrize("text,want", [
    (r"so \boxed{\frac{1}{2}} is it", r"\frac{1}{2}"),
    (r"first \boxed{3} then \boxed{\sqrt{x^{2}}}", r"\sqrt{x^{2}}"),       # last, nested braces
    (r"\boxed{{a}{b}}", "{a}{b}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 5", "5"),
    ("Thus the answer is 42.", "42"),
    ("The final answer is: $3.5$.", "$3.5$"),
    ("The Answer Is x = 7\nbye", "x = 7"),
    ("I think 3 apples and then 12 pears", "12"),
    ("total 1,234,567 dollars", "1,234,567"),
    ("ratio -3/4 here", "-3/4"),
    ("it is 2.50", "2.50"),
    ("no digits here", None),
    (r"unbalanced \boxed{3", None),
])
def test_extract_answer(text, want):
  assert R.extract_answer(text) == want


@pytest.mark.parametrize("pred,gold,ok", [
    ("42", "42", True),
    ("1,234", "1234", True),
    (r"\frac{1}{2}", "0.5", True),
    (r"\dfrac{3}{4}", "3/4", True),
    ("2.50", "2.5", True),
    ("$3.5$", "3.5", True),
    ("x = 7", "7", True),
    (r"\text{(B)}", "(b)", True),
    ("0.33333", "1/3", False),          # relative error 1e-5: beyond the 1e-6 tolerance
    ("0.3333333", "1/3", True),         # relative error 1e-7: within it
    ("41", "42", False),
    ("72", "Natalia sold 48/2 = 24 clips in May. #### 72", True),   # GSM8K gold
    (None, "1", False),
])
def test_answers_match(pred, gold, ok):
  assert R.answers_match(pred, gold) is ok


def test_math_reward_and_tulu_scale():
  row = {"prompt": "1/2 + 1/4 = ?", "answer": "3/4"}
  assert R.math_reward(row, r"We get \boxed{\frac{3}{4}}") == 1.0
  assert R.math_reward(row, "the answer is 0.75.") == 1.0
  assert R.math_reward(row, "maybe 0.7") == 0.0
  tulu = R.make_reward("math", correct=10.0)
  assert tulu(row, r"\boxed{0.75}") == 10.0 and tulu(row, "5") == 0.0


def test_exact_match_and_regex_format():
  assert R.exact_match({"answer": "Paris"}, "  Paris \n") == 1.0
  assert R.exact_match({"answer": "Paris"}, "paris") == 0.0
  good = "<think>\nstep 1\nstep 2</think>\n<answer>4</answer>"
  assert R.regex_format({}, good) == 1.0
  assert R.regex_format({}, "<answer>4</answer>") == 0.0
  assert R.regex_format({}, good + " trailing") == 0.0
  assert R.regex_format({}, "abc", pattern=r"[a-c]+") == 1.0


def test_bleu_matches_sacrebleu():
  refs = ["The cat sat on the mat .", "A cat was sitting on the mat ."]
  for hyp in ["The cat is on the mat .", "cat mat", "the the the", "The cat sat on the mat ."]:
    got = R.bleu({"references": refs}, hyp)
    want = sacrebleu.corpus_bleu([hyp], [[r] for r in refs], smooth_method="add-k",
                                 smooth_value=1, tokenize="13a", use_effective_order=True).score
    np.testing.assert_allclose(got, want / 100, rtol=1e-12)
  assert R.bleu({"references": refs}, "The cat sat on the mat .") == pytest.approx(1.0, rel=1e-12)
  assert R.bleu({"reference": refs[0]}, "   ") == 0.0
  assert R.bleu({"references": refs}, "") == 0.0


def test_no_eos_penalty_replaces_the_score():
  np.testing.assert_array_equal(R.no_eos_penalty([1.0, 0.0, 10.0], [False, True, True]),
                                [1.0, -10.0, -10.0])


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
      import threading
      release = threading.Event()

      def length(row, completion, scale=1.0):
        return scale * len(completion)

      def broken(row, completion):
        return 1.0 / row["denominator"]

      def not_a_number(row, completion):
        return "high"

      def nan(row, completion):
        return float("nan")

      def hangs(row, completion):
        if completion == "slow":
          release.wait(10)
        return 1.0
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "my_rewards"
  sys.modules.pop("my_rewards", None)


def test_user_reward_by_dotted_path(user_module):
  fn = R.make_reward(f"{user_module}:length", scale=2.0)
  assert fn({}, "abcd") == 8.0
  assert R.resolve("jpost.rl.rewards:exact_match") is R.exact_match
  with pytest.raises(ValueError, match="dotted path"):
    R.resolve("no_such_reward")
  with pytest.raises(AttributeError):
    R.resolve(f"{user_module}:missing")


def test_scorer_weights_and_penalty(user_module):
  scorer = R.Scorer.from_specs([{"name": "exact_match"},
                                {"name": f"{user_module}:length", "weight": 0.5}], max_workers=3)
  rows = [{"answer": "ab"}, {"answer": "x"}, {"answer": "abc"}]
  total, per = scorer.score(rows, ["ab", "yy", "abc"], truncated=[False, False, True],
                            no_eos_penalty_value=-10.0)
  np.testing.assert_array_equal(per["exact_match"], [1, 0, 1])
  np.testing.assert_array_equal(per[f"{user_module}:length"], [2, 2, 3])
  np.testing.assert_array_equal(total, [2.0, 1.0, -10.0])


@pytest.mark.parametrize("name,match", [("broken", "raised KeyError"),
                                        ("not_a_number", "not a number"),
                                        ("nan", "returned nan")])
def test_failing_reward_raises_with_the_row(user_module, name, match):
  scorer = R.Scorer([(name, R.resolve(f"{user_module}:{name}"), 1.0)], max_workers=2)
  rows = [{"prompt": "p0", "denominator": 2.0}, {"prompt": "the row that fails"}]
  if name != "broken":
    rows = rows[1:]
  with pytest.raises(R.RewardError, match=match) as err:
    scorer.score(rows, ["c"] * len(rows))
  assert "the row that fails" in str(err.value)
  assert f"'{name}'" in str(err.value)


def test_timeout_raises_with_the_row(user_module):
  mod = importlib.import_module(user_module)
  scorer = R.Scorer([("hangs", mod.hangs, 1.0)], max_workers=4, timeout_s=0.3)
  try:
    with pytest.raises(R.RewardError, match="timed out") as err:
      scorer.score([{"prompt": f"p{i}"} for i in range(4)], ["fast", "slow", "fast", "fast"])
    assert "row 1" in str(err.value) and "'slow'" in str(err.value)
  finally:
    mod.release.set()     # let the abandoned thread finish


def test_timeout_counts_from_the_start_of_each_call(user_module):
  # 8 calls of ~0.1 s on 2 workers take ~0.4 s in all: longer than the 0.25 s per-call limit,
  # but no single call exceeds it, so nothing times out.
  slow = lambda row, completion: threading.Event().wait(0.1) or 1.0
  scorer = R.Scorer([("slow", slow, 1.0)], max_workers=2, timeout_s=0.25)
  total, _ = scorer.score([{}] * 8, ["x"] * 8)
  np.testing.assert_array_equal(total, np.ones(8))
