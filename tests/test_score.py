"""scripts/score.py and jpost.scoring: reward-model scores and implicit-PRM step scores equal an
independent in-process computation; steps split at the delimiter; bad rows are named."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost import data as jdata
from jpost import models, scoring
from jpost.models import heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"prompt": "12+3=", "completion": "15"},
        {"prompt": "40-7=", "completion": "33", "id": "kept as is"},
        {"prompt": "9+9=", "chosen": "18", "rejected": "28"}]
STEPS = [{"prompt": "Q: 2+2*3?\n", "completion": "2*3=6\n\n2+6=8\n\nanswer 8"},
         {"prompt": "x=", "completion": "no steps here"}]


def _write(path, rows):
  with open(path, "w") as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
  return str(path)


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")


def _run(args):
  r = subprocess.run([sys.executable, "scripts/score.py"] + args, cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=600)
  return r


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
  """A reward model trained for 2 steps by the real recipe (configs/rm.py)."""
  workdir = str(tmp_path_factory.mktemp("rm"))
  flags = {"train.steps": 2, "train.batch_size": 8, "warm_start.sft_steps": 0,
           "optim.warmup_steps": 0, "optim.lr": 1e-2, "eval.every_steps": 0,
           "eval.max_batches": 1, "eval.batch_size": 8, "checkpoint.every_steps": 0,
           "log.tensorboard": False, "data.max_len": 16}
  r = subprocess.run([sys.executable, "scripts/train.py", "--config=configs/rm.py",
                      f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def _encode(prompt, completion, max_len=16):
  tok = jdata.ByteTokenizer()
  enc = jdata.Encoder(tok, kind="sft", chat_template=False, loss_on="completion",
                      max_len=max_len, overlong="truncate_left")
  return enc.prompt_completion(prompt, completion)[0]


def _reward(cfg, params, seq):
  """Independent: the full model on one unpadded sequence, the head on its last position."""
  ids = jnp.asarray(seq.ids)[None]
  pos = jnp.arange(len(seq.ids))[None]
  h = models.apply(cfg, params["lm"], ids, pos, jnp.ones_like(ids))
  return float(heads.scalar(params["reward_head"], h)[0, -1])


def test_reward_model_scores_match_the_model(rm_workdir, tmp_path):
  data = _write(tmp_path / "rows.jsonl", ROWS)
  out = str(tmp_path / "scored.jsonl")
  r = _run([data, f"--model={rm_workdir}", f"--output={out}", "--batch_size=2"])
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out) as f:
    scored = [json.loads(line) for line in f]
  assert [{k: v for k, v in s.items() if not k.startswith("score")} for s in scored] == ROWS

  model = scoring.load_model(rm_workdir)
  assert "reward_head" in model.params
  assert float(jnp.abs(model.params["reward_head"]["w"]).sum()) > 0   # trained, not zero-init
  want = [_reward(model.cfg, model.params, _encode("12+3=", "15")),
          _reward(model.cfg, model.params, _encode("40-7=", "33")),
          _reward(model.cfg, model.params, _encode("9+9=", "18")),
          _reward(model.cfg, model.params, _encode("9+9=", "28"))]
  got = [scored[0]["score"], scored[1]["score"], scored[2]["score_chosen"],
         scored[2]["score_rejected"]]
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert len(set(np.round(got, 6))) > 1


def test_bad_rows_are_named_with_file_line_and_field(rm_workdir, tmp_path):
  data = _write(tmp_path / "bad.jsonl", [ROWS[0], {"prompt": "1+1="}, "{not json",
                                         {"prompt": "1+1=", "chosen": "2"}])
  r = _run([data, f"--model={rm_workdir}"])
  assert r.returncode != 0
  assert "3 row(s)" in r.stderr
  assert f"{data}:2: missing field 'completion'" in r.stderr
  assert f"{data}:3: invalid JSON" in r.stderr
  assert f"{data}:4: missing field 'rejected'" in r.stderr
  # An LM-only model is not a reward model: say so, and how to get a PRM instead.
  model = scoring.load_model(rm_workdir)
  model = dataclasses.replace(model, params={"lm": model.params["lm"]})
  with pytest.raises(ValueError, match="no 'reward_head'.*--ref"):
    scoring.reward_scores(model, [_encode("1+1=", "2")])


def _hf_model(path, seed):
  cfg = dataclasses.replace(models.get_model_config("tiny"), dtype="float32")
  params = models.init_params(cfg, jax.random.PRNGKey(seed))
  models.save_hf(cfg, params, str(path))
  return cfg, params


def _token_logps(cfg, params, seq):
  """Independent: full [T, V] logits -> log_softmax -> log p(ids[j]) for j >= 1 (0 at j = 0)."""
  ids = jnp.asarray(seq.ids)[None]
  z = models.logits(cfg, params, ids)[0]
  lp = jax.nn.log_softmax(z, axis=-1)[jnp.arange(len(seq.ids) - 1), seq.ids[1:]]
  return np.concatenate([[0.0], np.asarray(lp)])


def test_prm_step_scores_sum_to_the_sequence_reward(rm_workdir, tmp_path):
  # Policy: the trained workdir's language model; reference: an HF directory. Mixed on purpose.
  ref_cfg, ref_params = _hf_model(tmp_path / "ref", seed=7)
  data = _write(tmp_path / "steps.jsonl", STEPS)
  out = str(tmp_path / "prm.jsonl")
  r = _run([data, f"--model={rm_workdir}", f"--ref=hf:{tmp_path / 'ref'}", "--max_len=40",
            "--beta=0.5", r"--delimiter=\n\n", f"--output={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  with open(out) as f:
    scored = [json.loads(line) for line in f]

  policy = scoring.load_model(rm_workdir)
  for row, got in zip(STEPS, scored):
    seq = _encode(row["prompt"], row["completion"], max_len=40)
    lp = _token_logps(policy.cfg, policy.params["lm"], seq)
    ref = _token_logps(ref_cfg, ref_params, seq)
    r_tok = 0.5 * (lp - ref) * seq.mask
    # The sequence-level implicit reward beta * (S_theta - S_ref) over the completion tokens.
    np.testing.assert_allclose(got["sum"], r_tok.sum(), atol=1e-4)
    np.testing.assert_allclose(sum(got["step_scores"]), got["sum"], atol=1e-5)
    assert got["min"] == pytest.approx(min(got["step_scores"]))
    # Byte tokenizer: one token per character, so the steps are exactly the delimited pieces
    # (each with its delimiter; EOS with the last).
    pieces = row["completion"].split("\n\n")
    assert len(got["step_scores"]) == len(pieces)
    start = seq.prompt_len
    for k, piece in enumerate(pieces):
      n = len(piece) + (2 if k < len(pieces) - 1 else 1)   # + delimiter, or + EOS
      np.testing.assert_allclose(got["step_scores"][k], r_tok[start:start + n].sum(), atol=1e-5)
      start += n
    assert start == len(seq.ids)


class _PieceTokenizer:
  """Decodes ids to fixed strings: lets a test choose BPE-like merges across a delimiter."""

  def __init__(self, pieces):
    self.pieces = pieces

  def decode(self, ids, skip_special_tokens=True):
    return "".join(self.pieces[i] for i in ids)


def test_step_ids_assign_a_straddling_token_to_its_first_character():
  tok = _PieceTokenizer(["<p>", "a", "b.", "\n\nThe", " end", "", "\n", "\nx", "b.\n\n", "The"])
  mask = lambda n: np.asarray([0] + [1] * (n - 1), np.int8)
  steps = lambda ids: scoring.step_ids(tok, jdata.Seq(np.asarray(ids), mask(len(ids)), 1), "\n\n")
  # "\n\nThe" starts with the delimiter that ends step 0: all of it (with "The") is in step 0.
  np.testing.assert_array_equal(steps([0, 1, 2, 3, 4, 5]), [-1, 0, 0, 0, 1, 1])
  # A merge ending at the boundary ("b.\n\n") splits exactly; EOS (no text) joins the last step.
  np.testing.assert_array_equal(steps([0, 1, 8, 9, 5]), [-1, 0, 0, 1, 1])
  # A delimiter split over two tokens: the token holding its last character starts in step 0.
  np.testing.assert_array_equal(steps([0, 1, 6, 7, 5]), [-1, 0, 0, 0, 0])
  assert scoring.parse_delimiter(r"\n\n") == "\n\n" and scoring.parse_delimiter("§ ") == "§ "
