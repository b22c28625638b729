"""scripts/sample.py end to end (subprocesses on a tiny random checkpoint) and its input errors."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jpost import models
from jpost.checkpoints import train_ckpt
from jpost.data.encode import Encoder
from jpost.data.tokenizer import ByteTokenizer

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASCII = range(ByteTokenizer.OFFSET + 32, ByteTokenizer.OFFSET + 127)   # printable byte ids


def _load_script():
  return helpers.load_script("sample")


sample = _load_script()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A jpost workdir as a training run leaves it: model_config.json, config.json, checkpoints/.

  Random params whose unembedding favours printable ASCII (other columns zeroed), so completions
  are readable text and a stop string taken from one run is spelled with the same tokens.
  """
  wd = tmp_path_factory.mktemp("run")
  cfg = models.get_model_config("tiny", dtype="float32")
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                        models.param_shapes(cfg))
  keep = np.zeros(cfg.vocab_size, bool)
  keep[list(ASCII)] = True
  params["lm_head"]["kernel"] = np.where(keep, 3 * params["lm_head"]["kernel"], 0.0)
  models.write_model_config_json(cfg, str(wd / "model_config.json"))
  (wd / "config.json").write_text(json.dumps({"data": {"tokenizer": "byte",
                                                       "chat_template": False}}))
  ckpt = train_ckpt.Checkpointer(str(wd / "checkpoints"), async_save=False)
  ckpt.save(3, {"params": {"lm": params}}, {}, {"step": 3})
  ckpt.close()
  return wd


def _run(*args, timeout=300):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sample.py"), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_samples_a_checkpoint_then_stops_on_a_stop_string(workdir, tmp_path):
  rows = [{"prompt": "1+2=", "id": 0},
          {"prompt": [{"role": "user", "content": "3+4="}], "id": 1, "answer": "7"}]
  prompts = tmp_path / "in.jsonl"
  prompts.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")   # a blank line is ok
  out = tmp_path / "out.jsonl"
  # 2 prompts x 2 samples in batches of 3: a full batch, then one padded with empty rows.
  r = _run(f"--model={workdir}", f"--prompts={prompts}", f"--out={out}", "--num_samples=2",
           "--batch_size=3", "--max_new_tokens=8", "--temperature=0")
  assert r.returncode == 0, r.stderr[-3000:]
  got = _read(out)
  assert [(g["id"], g["sample_index"]) for g in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for g, row in zip(got, [rows[0], rows[0], rows[1], rows[1]]):
    assert {k: g[k] for k in row} == row   # the input fields pass through
    assert set(g) == set(row) | {"completion", "num_tokens", "finished", "sample_index"}
    assert isinstance(g["completion"], str) and isinstance(g["finished"], bool)
  # Greedy: both samples of a prompt agree; the string and chat prompts differ.
  assert got[0]["completion"] == got[1]["completion"]
  assert got[2]["completion"] == got[3]["completion"]
  text = got[0]["completion"]
  assert got[0]["num_tokens"] == 8 and not got[0]["finished"] and len(text) == 8

  # A stop string from the middle of that completion: the same greedy run ends right after it,
  # and the stop string is cut from the text.
  stop = text[3:5]
  r = _run(f"--model={workdir}/checkpoints", f"--prompts={prompts}", f"--out={out}",
           "--max_new_tokens=8", "--temperature=0", f"--stop={stop}")
  assert r.returncode == 0, r.stderr[-3000:]
  first = _read(out)[0]
  cut = text.index(stop)
  assert first["completion"] == text[:cut]
  assert first["finished"] and first["num_tokens"] == cut + len(stop)


def test_malformed_jsonl_names_file_line_and_field(workdir, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "1+2="}\n{"prompt": "1+2=",}\n')
  r = _run(f"--model={workdir}", f"--prompts={bad}", f"--out={tmp_path / 'o.jsonl'}")
  assert r.returncode == 1
  assert f"{bad}:2: invalid JSON" in r.stderr and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "o.jsonl")

  # The same checks in process (no subprocess start-up per case).
  encoder = Encoder(ByteTokenizer(), kind="rl", chat_template=False, loss_on="completion",
                    max_len=64, overlong="drop", max_prompt_len=64)
  cases = {'{"promt": "x"}': "missing field 'prompt'",
           '{"prompt": 3}': "'prompt' must be a string",
           '["x"]': "expected a JSON object",
           '{"prompt": [{"role": "user"}]}': "prompt[0] has no 'content'",
           '{"prompt": "' + "x" * 80 + '"}': "prompt has 81 tokens > 64"}
  for line, message in cases.items():
    bad.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(sample.InputError) as e:
      sample.read_prompts(str(bad), encoder)
    assert str(e.value).startswith(f"{bad}:2: ") and message in str(e.value), str(e.value)


def test_completion_text_strips_eos_and_stop_tokens():
  tok = ByteTokenizer()
  ids = lambda s: tok.encode(s, add_special_tokens=False)
  eos = (tok.eos_id,)
  assert sample.completion_text(tok, ids("42") + [tok.eos_id], True, eos, [], []) == ("42", True)
  assert sample.completion_text(tok, ids("42\n\n"), True, eos, [tuple(ids("\n\n"))],
                                ["\n\n"]) == ("42", True)
  assert sample.completion_text(tok, ids("4 2"), False, eos, [], []) == ("4 2", False)
  # A stop string seen only in the text (spelled with other tokens) still ends the completion.
  assert sample.completion_text(tok, ids("ab. c"), False, eos, [], [". "]) == ("ab", True)
  # Ids past the tokenizer's vocabulary (a padded model vocabulary) have no text.
  assert sample.completion_text(tok, ids("a") + [400], False, eos, [], []) == ("a", False)
