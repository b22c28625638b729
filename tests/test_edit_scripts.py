"""scripts/merge.py and scripts/select_data.py end to end (in process: no JAX start-up per run)."""
import json
import os

import jax
import numpy as np
import pytest

from jpost import models
from jpost.checkpoints import train_ckpt

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


merge = helpers.load_script("merge")
select_data = helpers.load_script("select_data")


def _random_params(cfg, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      models.param_shapes(cfg))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Tiny random models saved with save_hf: a base, two fine-tuned, one of another shape; and
  a jpost workdir holding the second fine-tuned model's weights."""
  root = tmp_path_factory.mktemp("hf")
  cfg = models.get_model_config("tiny", dtype="float32")
  out = {}
  for name, seed in (("base", 0), ("ft1", 1), ("ft2", 2)):
    params = _random_params(cfg, seed)
    models.save_hf(cfg, params, str(root / name))
    out[name] = (str(root / name), params)
  other = models.get_model_config("tiny", dtype="float32", mlp_dim=64)
  models.save_hf(other, _random_params(other, 3), str(root / "other"))
  out["other"] = (str(root / "other"), None)
  wd = root / "run"
  wd.mkdir()
  models.write_model_config_json(cfg, str(wd / "model_config.json"))
  ckpt = train_ckpt.Checkpointer(str(wd / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": {"lm": out["ft2"][1]}}, {}, {"step": 1})
  ckpt.close()
  out["run"] = (str(wd), out["ft2"][1])
  return out


def _read(path):
  return models.load_hf(path, dtype="float32")[1]


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol),
               a, b)


def test_merge_lines_end_points_and_task_arithmetic(hf_dirs, tmp_path, capsys):
  base, p0 = hf_dirs["base"]
  ft1, p1 = hf_dirs["ft1"]
  run, p2 = hf_dirs["run"]
  # LiNeS with alpha=1, beta=0: the fine-tuned model; alpha=0, beta=0: the base.
  for (alpha, beta), want in (((1, 0), p1), ((0, 0), p0)):
    out = str(tmp_path / f"lines_{alpha}")
    assert merge.main([f"--base={base}", f"--finetuned=hf:{ft1}", f"--out={out}",
                       "--method=lines", f"--alpha={alpha}", f"--beta={beta}"]) == 0, \
        capsys.readouterr().err
    _close(_read(out), want)
  info = json.load(open(os.path.join(out, "merge_info.json")))
  assert info["layer_scales"] == [0.0, 0.0] and info["dtype"] == "float32"

  # Task arithmetic over an HF model and a jpost workdir: base + tau1 + tau2.
  out = str(tmp_path / "ta")
  assert merge.main([f"--base=hf:{base}", f"--finetuned={ft1}", f"--finetuned={run}",
                     f"--out={out}"]) == 0, capsys.readouterr().err
  _close(_read(out), jax.tree.map(lambda a, b, c: b + c - a, p0, p1, p2), atol=1e-4)
  # Multi-task LiNeS: alpha = 1/T for the sum; the default beta 0.5 reaches the last block.
  out = str(tmp_path / "lines2")
  assert merge.main([f"--base={base}", f"--finetuned={ft1}", f"--finetuned={run}",
                     f"--out={out}", "--method=lines"]) == 0
  info = json.load(open(os.path.join(out, "merge_info.json")))
  assert info["alpha"] == pytest.approx(0.5) and info["layer_scales"] == pytest.approx([0.5, 1.0])
  got = _read(out)
  tau = jax.tree.map(lambda a, b, c: b + c - 2 * a, p0, p1, p2)
  np.testing.assert_allclose(got["layers"]["mlp"]["up_proj"]["kernel"][1],
                             p0["layers"]["mlp"]["up_proj"]["kernel"][1]
                             + tau["layers"]["mlp"]["up_proj"]["kernel"][1], atol=1e-4)
  np.testing.assert_allclose(got["embed"]["embedding"],
                             p0["embed"]["embedding"] + 0.5 * tau["embed"]["embedding"],
                             atol=1e-4)
  # --dtype casts the written weights.
  out = str(tmp_path / "bf16")
  assert merge.main([f"--base={base}", f"--finetuned={ft1}", f"--out={out}",
                     "--dtype=bfloat16"]) == 0
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"


def test_merge_refuses_mismatched_models_and_bad_flags(hf_dirs, tmp_path, capsys):
  base, _ = hf_dirs["base"]
  other, _ = hf_dirs["other"]
  out = str(tmp_path / "x")
  assert merge.main([f"--base={base}", f"--finetuned={other}", f"--out={out}"]) == 1
  err = capsys.readouterr().err
  assert f"--finetuned={other} is not the same architecture as --base={base}" in err
  assert "mlp_dim: 128 vs 64" in err and "Traceback" not in err
  assert merge.main([f"--base={base}", f"--finetuned={tmp_path / 'nope'}", f"--out={out}"]) == 1
  assert "no such directory" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    merge.parse_args([f"--base={base}", f"--finetuned={base}", f"--out={out}", "--alpha=0.5"])
  with pytest.raises(SystemExit):
    merge.parse_args([f"--base={base}", f"--finetuned={base}", f"--out={out}", "--lam=0.5",
                      "--method=lines"])


# ----------------------------------------------------------------------------- select_data.py

def test_select_data_end_to_end(tmp_path, capsys):
  rng = np.random.default_rng(0)
  math_rows = [{"prompt": f"What is {a} * {b}?", "completion": f"{a} * {b} = {a * b}"}
               for a, b in rng.integers(10, 99, size=(12, 2))]
  prose = ["Autumn leaves drifted across the quiet courtyard of the old library.",
           "The ferry left the harbour late because of the thick morning fog.",
           "Her grandmother kept a small garden of roses, mint and tomatoes.",
           "Nobody in the village remembered who had planted the great oak tree."]
  candidates = [{"text": prose[0]}, math_rows[0], {"messages": [
      {"role": "user", "content": prose[1]}, {"role": "assistant", "content": prose[2]}]},
      math_rows[1], {"text": prose[3], "id": 7}, math_rows[2]]
  cand = tmp_path / "cand.jsonl"
  # Rows are written back exactly as read (key order, spacing), blank lines skipped.
  lines = [json.dumps(r, indent=None, separators=(", ", ":")) for r in candidates]
  cand.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
  target = tmp_path / "target.jsonl"
  target.write_text("".join(json.dumps(r) + "\n" for r in math_rows[3:]))
  out, scores = tmp_path / "sel.jsonl", tmp_path / "scores.jsonl"
  assert select_data.main([f"--candidates={cand}", f"--target={target}", "--k=3",
                           f"--out={out}", f"--scores={scores}", "--workers=2"]) == 0, \
      capsys.readouterr().err
  selected = out.read_text().splitlines()
  assert sorted(selected) == sorted([lines[1], lines[3], lines[5]])
  got = [json.loads(line) for line in scores.read_text().splitlines()]
  assert [g["index"] for g in got] == list(range(6))
  assert [g["line"] for g in got] == [1, 2, 3, 5, 6, 7]
  assert [g["selected"] for g in got] == [False, True, False, True, False, True]
  best_first = [json.loads(s) for s in selected]
  by_text = {json.dumps(candidates[g["index"]]): g["score"] for g in got}
  assert [by_text[json.dumps(r)] for r in best_first] == sorted(
      [by_text[json.dumps(r)] for r in best_first], reverse=True)

  # A bad candidate line is named with its file and line; nothing is written.
  cand.write_text(lines[0] + "\n" + '{"prompt": "x"}\n')
  out.unlink()
  assert select_data.main([f"--candidates={cand}", f"--target={target}", "--k=1",
                           f"--out={out}"]) == 1
  err = capsys.readouterr().err
  assert f"{cand}:2: no 'text', 'prompt' + 'completion'/'chosen' or 'messages'" in err
  assert not out.exists()
