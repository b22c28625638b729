"""Sample completions for a JSONL file of prompts from a jpost run or a Hugging Face model.

  python scripts/sample.py --model=runs/sft-20261121-120000 --prompts=in.jsonl --out=out.jsonl \
      [--tokenizer=byte|hf:DIR] [--chat_template | --no-chat_template] [--max_new_tokens=64]
      [--temperature=0.7] [--top_p=1] [--top_k=0] [--num_samples=1] [--seed=0]
      [--batch_size=16] [--stop=STR ...] [--dtype=bfloat16]

--model is a jpost workdir (or its checkpoints/ directory: the latest checkpoint's params and the
workdir's model_config.json), or an HF directory (`hf:DIR`, or a directory with an HF
config.json and no model_config.json). The tokenizer and chat-template setting default to the
run's `data.tokenizer` / `data.chat_template` (a workdir), or to the HF directory's tokenizer.

Each input line is an object with a `prompt` (a string, or a list of {role, content} messages),
encoded as the data pipeline encodes RL prompts: messages (or any prompt with --chat_template) are
rendered with the generation prompt. Each output line is the input object plus `completion`
(the decoded text without EOS / stop tokens), `num_tokens` (generated, EOS / stop included),
`finished` (ended by EOS or a stop string rather than --max_new_tokens) and `sample_index`.
"""
import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class InputError(ValueError):
  """A problem with the command line or the prompts file, reported without a traceback."""


# --- the model ---------------------------------------------------------------------------------

def _jpost_workdir(path):
  """The workdir holding model_config.json for a workdir or its checkpoints/ dir, else None."""
  path = os.path.abspath(path)
  for d in (path, os.path.dirname(path)):
    if os.path.exists(os.path.join(d, "model_config.json")):
      return d
  return None


def resolve_model(spec: str) -> dict:
  """--model -> {'kind': 'jpost'|'hf', 'path', 'workdir', 'tokenizer', 'chat_template'}."""
  path = os.path.expanduser(spec[3:] if spec.startswith("hf:") else spec)
  if not os.path.isdir(path):
    raise InputError(f"--model={spec}: no such directory")
  workdir = None if spec.startswith("hf:") else _jpost_workdir(path)
  if workdir is not None:
    data = {}
    run_config = os.path.join(workdir, "config.json")
    if os.path.exists(run_config):
      with open(run_config) as f:
        data = json.load(f).get("data", {})
    return dict(kind="jpost", path=path, workdir=workdir,
                tokenizer=data.get("tokenizer", "byte"),
                chat_template=bool(data.get("chat_template", False)))
  if not os.path.exists(os.path.join(path, "config.json")):
    raise InputError(f"--model={spec}: neither a jpost workdir (no model_config.json) nor a "
                     "Hugging Face directory (no config.json)")
  has_tok = os.path.exists(os.path.join(path, "tokenizer.json"))
  return dict(kind="hf", path=path, workdir=None, tokenizer=f"hf:{path}" if has_tok else None,
              chat_template=False)


def load_model(model: dict, dtype: str | None):
  """-> (model_cfg, lm params)."""
  import dataclasses

  import jax.numpy as jnp
  from jpost import models
  from jpost.checkpoints import train_ckpt

  if model["kind"] == "hf":
    return models.load_hf(model["path"], dtype=jnp.dtype(dtype or "float32"))
  cfg = models.read_model_config_json(os.path.join(model["workdir"], "model_config.json"))
  params = train_ckpt.load_params(model["path"])["lm"]
  if dtype:   # the compute dtype; the stored weights are cast by the matmuls
    cfg = dataclasses.replace(cfg, dtype=dtype)
  return cfg, params


# --- prompts -----------------------------------------------------------------------------------

def read_prompts(path: str, encoder) -> list[tuple[dict, list[int]]]:
  """JSONL rows -> [(row, prompt ids)]; any bad row is an InputError naming path:line."""
  from jpost.data.schema import RowError, validate

  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object with a 'prompt' field, got "
                         f"{type(row).__name__}")
      try:
        (seq,), _ = encoder.encode(validate(row, "rl"))
      except RowError as e:
        raise InputError(f"{where}: {e}") from None
      out.append((row, [int(i) for i in seq.ids]))
  if not out:
    raise InputError(f"{path}: no prompts")
  return out


# --- completions -------------------------------------------------------------------------------

def completion_text(tokenizer, ids, stopped, eos_ids, stop_ids, stop_strings):
  """Generated ids -> (text without the EOS / stop tokens, finished).

  Stop strings are also cut at the text level: a token-level stop sequence can miss a stop
  string that the model spelled with different tokens.
  """
  ids = list(ids)
  if stopped and ids and ids[-1] in eos_ids:
    ids = ids[:-1]
  elif stopped:
    for seq in stop_ids:
      if len(ids) >= len(seq) and tuple(ids[-len(seq):]) == tuple(seq):
        ids = ids[:-len(seq)]
        break
  # A model's vocabulary may be padded past the tokenizer's (tiny: 512 vs the byte tokenizer's
  # 259); such ids have no text.
  text = tokenizer.decode([i for i in ids if i < tokenizer.vocab_size], skip_special_tokens=True)
  finished = bool(stopped)
  cuts = [text.find(s) for s in stop_strings if s in text]
  if cuts:
    text, finished = text[:min(cuts)], True
  return text, finished


def _eos_ids(tokenizer, model_cfg):
  ids = {tokenizer.eos_id}
  eos = model_cfg.eos_token_id
  ids.update([] if eos is None else [eos] if isinstance(eos, int) else eos)
  return tuple(sorted(int(i) for i in ids))


def _batches(prompts, num_samples, batch_size):
  """(prompt index, sample index) pairs in output order, cut into batches."""
  pairs = [(i, k) for i in range(len(prompts)) for k in range(num_samples)]
  return [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", required=True, help="jpost workdir / checkpoints dir, or hf:DIR")
  p.add_argument("--prompts", required=True, help="input JSONL with a 'prompt' per line")
  p.add_argument("--out", required=True, help="output JSONL")
  p.add_argument("--tokenizer", default=None, help="'byte' or 'hf:DIR' (default: the model's)")
  p.add_argument("--chat_template", action=argparse.BooleanOptionalAction, default=None,
                 help="render string prompts through the chat template (default: the run's "
                      "data.chat_template; message-list prompts always use it)")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0, help="0 = off")
  p.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=16, help="sequences per generate call")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
  args = p.parse_args(argv)
  for name in ("max_new_tokens", "num_samples", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  return args


def run(args) -> int:
  """Writes args.out; returns the number of samples."""
  from jpost.data.encode import Encoder
  from jpost.data.tokenizer import make_tokenizer
  from jpost.rl import sampler

  model = resolve_model(args.model)
  spec = args.tokenizer or model["tokenizer"]
  if spec is None:
    raise InputError(f"--model={args.model} has no tokenizer.json: pass --tokenizer")
  try:
    tokenizer = make_tokenizer(types.SimpleNamespace(tokenizer=spec))
  except (ValueError, FileNotFoundError) as e:
    raise InputError(f"--tokenizer={spec}: {e}") from None
  chat = model["chat_template"] if args.chat_template is None else args.chat_template
  max_prompt = max(sampler.DEFAULT_BUCKETS)
  encoder = Encoder(tokenizer, kind="rl", chat_template=chat, loss_on="completion",
                    max_len=max_prompt, overlong="drop", max_prompt_len=max_prompt)
  prompts = read_prompts(args.prompts, encoder)   # fail on bad input before loading weights
  stop_ids = []
  for s in args.stop:
    ids = tokenizer.encode(s, add_special_tokens=False)
    if not ids:
      raise InputError(f"--stop={s!r} encodes to no tokens")
    stop_ids.append(tuple(ids))

  import jax
  import numpy as np

  model_cfg, params = load_model(model, args.dtype)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise InputError(f"tokenizer {spec} has {tokenizer.vocab_size} tokens but the model's "
                     f"vocab_size is {model_cfg.vocab_size}: wrong --tokenizer?")
  eos_ids = _eos_ids(tokenizer, model_cfg)
  try:
    sc = sampler.SamplingConfig(max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, eos_ids=eos_ids,
                                stop_sequences=tuple(stop_ids))
  except ValueError as e:
    raise InputError(str(e)) from None
  params = jax.device_put(params)
  key = jax.random.PRNGKey(args.seed)
  n = 0
  with open(args.out, "w", encoding="utf-8") as f:
    for b, batch in enumerate(_batches(prompts, args.num_samples, args.batch_size)):
      # Always a full batch (padding rows have length 0): one compile per prompt bucket.
      lengths = np.zeros(args.batch_size, np.int32)
      lengths[:len(batch)] = [len(prompts[i][1]) for i, _ in batch]
      tokens = np.zeros((args.batch_size, max(int(lengths.max()), 1)), np.int32)
      for j, (i, _) in enumerate(batch):
        tokens[j, tokens.shape[1] - lengths[j]:] = prompts[i][1]
      out = sampler.generate(model_cfg, params, tokens, lengths, jax.random.fold_in(key, b), sc)
      for j, (i, k) in enumerate(batch):
        length = int(out["lengths"][j])
        text, finished = completion_text(tokenizer, out["tokens"][j, :length],
                                         bool(out["stopped"][j]), eos_ids, stop_ids, args.stop)
        row = dict(prompts[i][0], completion=text, num_tokens=length, finished=finished,
                   sample_index=k)
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
  return n


def main(argv=None):
  args = parse_args(argv)
  try:
    n = run(args)
  except (InputError, FileNotFoundError) as e:
    print(f"sample.py: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {n} samples to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
