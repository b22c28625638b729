"""QAlign: the acceptance rule, the chain's stationary distribution on a toy model, the vote, and
scripts/sample.py --qalign end to end on a tiny random checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from jpost import data as jdata
from jpost import models
from jpost import scoring
from jpost.checkpoints import train_ckpt
from jpost.data.tokenizer import ByteTokenizer
from jpost.rl import qalign
from jpost.rl import rewards

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ acceptance rule

def test_acceptance_prob_matches_numpy_including_the_clip():
  rng = np.random.default_rng(0)
  r_old, r_new = rng.normal(size=200) * 5, rng.normal(size=200) * 5
  len_old, len_new = rng.integers(1, 50, 200), rng.integers(1, 50, 200)
  for beta in (1.0, 0.3):
    want = np.minimum(1, np.exp(np.clip((r_new - r_old) / beta + np.log(len_old / len_new),
                                        -20, 20)))
    np.testing.assert_allclose(qalign.acceptance_prob(r_old, r_new, len_old, len_new, beta),
                               want, rtol=1e-12)
  # The clip: a hopeless proposal keeps probability exp(-20), not exp(-100).
  assert qalign.acceptance_prob(0.0, -100.0, 10, 10) == pytest.approx(np.exp(-20), rel=1e-12)
  assert qalign.acceptance_prob(0.0, 100.0, 1, 1000) == 1.0
  # Constant reward: only the length ratio.
  assert qalign.acceptance_prob(1.0, 1.0, 3, 6) == pytest.approx(0.5)
  assert qalign.acceptance_prob(1.0, 1.0, 6, 3) == 1.0
  with pytest.raises(ValueError):
    qalign.acceptance_prob(0.0, 0.0, 0, 3)
  with pytest.raises(ValueError):
    qalign.acceptance_prob(0.0, 0.0, 1, 3, beta=0.0)


def test_constant_reward_accept_rate_follows_the_length_ratio():
  # A fake proposal of known lengths: always a 3-token suffix, so |y'| = k + 3 for a kept prefix
  # of k tokens. With a constant reward each proposal is accepted with min(1, |y| / (k + 3)).
  zero = lambda ids, ys: np.zeros(len(ys))
  three = lambda ids, prefixes: [(7, 7, 2)] * len(prefixes)
  chains = qalign.run_chains(three, zero, [(2,)] * 3000, 6, np.random.default_rng(0))
  # Step 1 from a 1-token state: k = 0, |y'| = 3, probability 1/3 (3000 draws, sd 0.009).
  first = [ch.steps[0] for ch in chains]
  assert all(s["keep"] == 0 and s["len_new"] == 3 for s in first)
  assert abs(np.mean([s["accepted"] for s in first]) - 1 / 3) < 0.03
  props = [s for ch in chains for s in ch.steps]
  assert all(s["len_new"] == s["keep"] + 3 for s in props)
  expected = np.mean([min(1.0, s["len_old"] / s["len_new"]) for s in props])
  assert abs(np.mean([s["accepted"] for s in props]) - expected) < 0.02
  assert abs(np.mean([ch.accept_rate for ch in chains]) - expected) < 0.02

  # Any proposal (here the geometric toy model below): the same match.
  chains = qalign.run_chains(_geometric_model(0.3, np.random.default_rng(3)), zero,
                             [(2,)] * 500, 10, np.random.default_rng(4))
  props = [s for ch in chains for s in ch.steps]
  expected = np.mean([min(1.0, s["len_old"] / s["len_new"]) for s in props])
  assert abs(np.mean([s["accepted"] for s in props]) - expected) < 0.02
  assert expected < 0.95   # the length term did matter


def _geometric_model(q, rng):
  """A toy LM: tokens 1 until EOS (2), which comes with probability q at each step, so a
  completion has length n >= 1 with probability (1 - q)^(n - 1) q, whatever the prefix."""
  def propose(ids, prefixes):
    out = []
    for _ in prefixes:
      m = int(rng.geometric(q))
      out.append((1,) * (m - 1) + (2,))
    return out
  return propose


@pytest.mark.parametrize("tilt", [0.0, 0.4])
def test_chain_samples_the_reward_tilted_model(tilt):
  # Target pi(y) ∝ p(y) exp(r(y) / beta) with r(y) = tilt * |y|: for the geometric toy model a
  # geometric length law with ratio rho = (1 - q) e^tilt. tilt = 0 (constant reward) checks that
  # the length-ratio term exactly undoes the proposal's bias; without it short states would win.
  q, n_chains, steps = 0.5, 3000, 25
  rng = np.random.default_rng(1)
  propose = _geometric_model(q, np.random.default_rng(2))
  reward = lambda ids, ys: np.asarray([tilt * len(y) for y in ys])
  y0s = [(2,)] * n_chains   # every chain starts far from the target (length 1)
  chains = qalign.run_chains(propose, reward, y0s, steps, rng, beta=1.0)
  final = np.asarray([len(ch.states[-1]) for ch in chains])
  rho = (1 - q) * np.exp(tilt)
  for n in range(1, 6):
    want = (1 - rho) * rho ** (n - 1)
    assert abs(np.mean(final == n) - want) < 0.03, (n, np.mean(final == n), want)


def test_run_chain_single_and_bad_proposals():
  rng = np.random.default_rng(0)
  chain = qalign.run_chain(lambda prefix: (5, 2), lambda y: float(len(y)), (1, 2), 5, rng)
  assert len(chain.states) == len(chain.rewards) == 6 and len(chain.steps) == 5
  assert chain.states[0] == (1, 2) and all(s[-2:] == (5, 2) or s == (1, 2) for s in chain.states)
  assert chain.accepted()[0] == 0 and 0 <= chain.accept_rate <= 1
  with pytest.raises(ValueError, match="empty suffix"):
    qalign.run_chain(lambda prefix: (), lambda y: 0.0, (1, 2), 1, rng)
  with pytest.raises(ValueError, match="empty"):
    qalign.run_chain(lambda prefix: (1,), lambda y: 0.0, (), 1, rng)


def test_majority_vote():
  assert qalign.majority_vote(["3", "4", "3", None, None, None]) == ("3", {"3": 2, "4": 1,
                                                                           None: 3})
  assert qalign.majority_vote([None, None])[0] is None
  assert qalign.majority_vote(["b", "a", "a", "b"])[0] == "b"   # a tie goes to the first seen
  assert qalign.majority_vote(["x"])[0] == "x"


# --------------------------------------------------------------------------- sample.py --qalign

def _load_script():
  return helpers.load_script("sample")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny random jpost workdir whose unembedding only produces digits, '+', '=' and EOS, so
  completions contain numbers for the math reward to read."""
  wd = tmp_path_factory.mktemp("run")
  cfg = models.get_model_config("tiny", dtype="float32")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                        models.param_shapes(cfg))
  tok = ByteTokenizer()
  keep = np.zeros(cfg.vocab_size, bool)
  keep[[tok.OFFSET + ord(c) for c in "0123456789+= "] + [tok.eos_id]] = True
  params["lm_head"]["kernel"] = np.where(keep, 3 * params["lm_head"]["kernel"], -30.0)
  models.write_model_config_json(cfg, str(wd / "model_config.json"))
  (wd / "config.json").write_text(json.dumps({"data": {"tokenizer": "byte",
                                                       "chat_template": False}}))
  ckpt = train_ckpt.Checkpointer(str(wd / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": {"lm": params}}, {}, {"step": 1})
  ckpt.close()
  # A reward model beside it: the same trunk with a random scalar head.
  rm = tmp_path_factory.mktemp("rm")
  models.write_model_config_json(cfg, str(rm / "model_config.json"))
  (rm / "config.json").write_text((wd / "config.json").read_text())
  head = {"w": rng.normal(size=cfg.d_model).astype(np.float32), "b": np.zeros((), np.float32)}
  ckpt = train_ckpt.Checkpointer(str(rm / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": {"lm": params, "reward_head": head}}, {}, {"step": 1})
  ckpt.close()
  return wd, rm


def test_sample_script_qalign_end_to_end(workdir, tmp_path, capsys):
  workdir, rm = workdir
  sample = _load_script()
  rows = [{"prompt": "1+2=", "answer": "3", "id": 0}, {"prompt": "3+4=", "answer": "7", "id": 1}]
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "out.jsonl"
  steps = 4
  argv = [f"--model={workdir}", f"--prompts={prompts}", f"--out={out}", "--qalign",
          "--reward=math", f"--qalign_steps={steps}", "--num_samples=2", "--batch_size=4",
          "--max_new_tokens=6", "--temperature=1"]
  assert sample.main(argv) == 0, capsys.readouterr().err
  got = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(g["id"], g["sample_index"]) for g in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for g, row in zip(got, [rows[0], rows[0], rows[1], rows[1]]):
    assert {k: g[k] for k in row} == row
    assert sum(g["qalign_votes"].values()) == steps + 1
    assert 0 <= g["qalign_accept_rate"] <= 1
    chain = g["qalign_chain"]
    assert chain[0]["step"] == 0 and len(chain) == 1 + round(g["qalign_accept_rate"] * steps)
    assert [c["step"] for c in chain] == sorted(c["step"] for c in chain)
    assert all(c["reward"] in (0.0, 1.0) for c in chain)
    assert g["completion"] in [c["completion"] for c in chain]
    assert 1 <= g["num_tokens"] <= 6 and isinstance(g["finished"], bool)
    # The vote's answer is the one the reported completion holds.
    assert g["qalign_answer"] == rewards.extract_answer(g["completion"])

  # Same seed, same chains.
  out2 = tmp_path / "out2.jsonl"
  assert sample.main(argv[:2] + [f"--out={out2}"] + argv[3:]) == 0
  assert out2.read_text() == out.read_text()

  # A trained reward model scores the chain instead (real-valued rewards); text vote.
  out3 = tmp_path / "out3.jsonl"
  argv3 = argv[:2] + [f"--out={out3}", "--qalign", f"--reward_model={rm}",
                      "--qalign_vote=text"] + argv[5:] + ["--qalign_steps=2", "--num_samples=1"]
  assert sample.main(argv3) == 0, capsys.readouterr().err
  got = [json.loads(line) for line in out3.read_text().splitlines()]
  rewards_seen = {c["reward"] for g in got for c in g["qalign_chain"]}
  assert len(rewards_seen) > 1 and not rewards_seen <= {0.0, 1.0}
  assert all(g["qalign_answer"] == g["completion"] for g in got)
  # The chain's rewards are what scripts/score.py (jpost.scoring) gives the same rows.
  scored = [{"prompt": g["prompt"], "completion": c["completion"], "reward": c["reward"]}
            for g in got for c in g["qalign_chain"] if c["completion"].strip()]
  rows_file = tmp_path / "scored.jsonl"
  rows_file.write_text("".join(json.dumps(r) + "\n" for r in scored))
  model = scoring.load_model(str(rm))
  data_cfg = scoring.data_config([model])
  items = scoring.encode_file(str(rows_file), jdata.make_tokenizer(data_cfg), data_cfg)
  np.testing.assert_allclose([r["score"] for r in scoring.score_rm(items, model)],
                             [r["reward"] for r in scored], rtol=1e-4, atol=1e-4)

  # The math reward needs each row's answer: the row is named before any weights load.
  prompts.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "5+5="}) + "\n")
  assert sample.main(argv) == 1
  assert f"{prompts}:2: --reward=math needs an 'answer' field" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    sample.parse_args(argv[:3] + ["--qalign"])   # no reward
