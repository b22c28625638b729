"""Sample completions for a JSONL file of prompts from a jpost run or a Hugging Face model.

  python scripts/sample.py --model=runs/sft-20261121-120000 --prompts=in.jsonl --out=out.jsonl \
      [--tokenizer=byte|hf:DIR] [--chat_template | --no-chat_template] [--max_new_tokens=64]
      [--temperature=0.7] [--top_p=1] [--top_k=0] [--num_samples=1] [--seed=0]
      [--batch_size=16] [--stop=STR ...] [--dtype=bfloat16]
      [--qalign --reward=math | --reward_model=RM_WORKDIR [--qalign_steps=16] [--qalign_beta=1]
       [--qalign_vote=answer|text]]

--model is a jpost workdir (or its checkpoints/ directory: the latest checkpoint's params and the
workdir's model_config.json), or an HF directory (`hf:DIR`, or a directory with an HF
config.json and no model_config.json). The tokenizer and chat-template setting default to the
run's `data.tokenizer` / `data.chat_template` (a workdir), or to the HF directory's tokenizer.

Each input line is an object with a `prompt` (a string, or a list of {role, content} messages),
encoded as the data pipeline encodes RL prompts: messages (or any prompt with --chat_template) are
rendered with the generation prompt. Each output line is the input object plus `completion`
(the decoded text without EOS / stop tokens), `num_tokens` (generated, EOS / stop included),
`finished` (ended by EOS or a stop string rather than --max_new_tokens) and `sample_index`.

--qalign (test-time alignment, jpost/rl/qalign.py): each of the --num_samples samples per prompt
is a QAlign MCMC chain of --qalign_steps steps that resamples suffixes of its completion and
accepts them by the reward (--reward=NAME, a jpost.rl.rewards reward such as `math`, which reads
the row's `answer`; or --reward_model=PATH, a jpost reward-model workdir) at temperature
--qalign_beta. The chain's answer is a majority vote over its states (--qalign_vote=answer: the
extracted final answer; text: the whole completion). Such a line also has `qalign_answer`,
`qalign_votes`, `qalign_accept_rate` and `qalign_chain` (the initial and every accepted state:
step, completion, reward); its `completion` is the latest state holding the voted answer.
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

def resolve_model(spec: str) -> dict:
  """--model -> {'kind': 'jpost'|'hf', 'path', 'workdir', 'tokenizer', 'chat_template'}."""
  from jpost.models import resolve

  try:
    source = resolve.resolve(spec)
  except FileNotFoundError as e:
    raise InputError(f"--model={e}") from None
  if source.kind == "jpost":
    data = source.run_config().get("data", {})
    return dict(kind="jpost", path=source.path, workdir=source.workdir, source=source,
                tokenizer=data.get("tokenizer", "byte"),
                chat_template=bool(data.get("chat_template", False)))
  has_tok = os.path.exists(os.path.join(source.path, "tokenizer.json"))
  return dict(kind="hf", path=source.path, workdir=None, source=source,
              tokenizer=f"hf:{source.path}" if has_tok else None, chat_template=False)


def load_model(model: dict, dtype: str | None):
  """-> (model_cfg, lm params)."""
  from jpost.models import resolve

  return resolve.load_lm(model["source"], dtype)


# --- prompts -----------------------------------------------------------------------------------

def read_prompts(path: str, encoder) -> list[tuple[dict, list[int], str]]:
  """JSONL rows -> [(row, prompt ids, 'path:line')]; any bad row is an InputError naming
  path:line."""
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
      out.append((row, [int(i) for i in seq.ids], where))
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
  q = p.add_argument_group("QAlign (MCMC test-time alignment)")
  q.add_argument("--qalign", action="store_true", help="run a QAlign chain per sample")
  q.add_argument("--qalign_steps", type=int, default=16, help="MCMC steps per chain")
  q.add_argument("--qalign_beta", type=float, default=1.0, help="reward temperature beta")
  q.add_argument("--qalign_vote", choices=("answer", "text"), default="answer",
                 help="vote on the extracted final answer or on the whole completion")
  q.add_argument("--reward", default=None,
                 help="reward by name (math, exact_match, ... or package.module:function)")
  q.add_argument("--reward_model", default=None, help="a jpost reward-model workdir")
  args = p.parse_args(argv)
  for name in ("max_new_tokens", "num_samples", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  if args.qalign:
    if (args.reward is None) == (args.reward_model is None):
      p.error("--qalign needs one of --reward=NAME or --reward_model=PATH")
    if args.qalign_steps < 0:
      p.error("--qalign_steps must be >= 0")
    if args.qalign_beta <= 0:
      p.error("--qalign_beta must be > 0")
  elif args.reward is not None or args.reward_model is not None:
    p.error("--reward / --reward_model are for --qalign")
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
  if args.qalign:   # QAlign re-prompts with prompt + a kept prefix of up to max_new_tokens - 1
    max_prompt -= args.max_new_tokens - 1
    if max_prompt < 1:
      raise InputError(f"--max_new_tokens={args.max_new_tokens} leaves no room for a prompt "
                       f"under the largest prompt bucket ({max(sampler.DEFAULT_BUCKETS)})")
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

  reward_fn = None
  if args.qalign:   # before the policy's weights: a row the reward cannot score fails fast
    reward_fn = make_reward_fn(args, [row for row, _, _ in prompts], [w for _, _, w in prompts])
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
  if args.qalign:
    return run_qalign(args, prompts, model_cfg, params, sc, tokenizer, eos_ids, stop_ids,
                      reward_fn, key)
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


# --- QAlign ------------------------------------------------------------------------------------

def make_reward_fn(args, rows, wheres):
  """-> fn(prompt indices, completion texts) -> rewards [N] float, from --reward or
  --reward_model. Rows a named built-in reward cannot score (no `answer`) fail here, naming
  path:line, before any sampling."""
  import numpy as np
  from jpost.rl import rewards

  if args.reward is not None:
    try:
      fn = rewards.make_reward(args.reward)
    except (ValueError, ImportError, AttributeError) as e:
      raise InputError(f"--reward={args.reward}: {e}") from None
    if args.reward in ("math", "exact_match"):
      for row, where in zip(rows, wheres):
        if row.get("answer") is None:
          raise InputError(f"{where}: --reward={args.reward} needs an 'answer' field (fields "
                           f"found: {', '.join(sorted(row))})")
    scorer = rewards.Scorer([(args.reward, fn, 1.0)])

    def named(idx, texts):
      try:
        total, _ = scorer.score([rows[i] for i in idx], texts)
      except rewards.RewardError as e:
        raise InputError(str(e)) from None
      return total

    return named

  from jpost import data as jdata
  from jpost import scoring
  from jpost.data.schema import RowError

  try:
    rm = scoring.load_model(args.reward_model, args.dtype)
  except (FileNotFoundError, ValueError) as e:
    raise InputError(f"--reward_model={args.reward_model}: {e}") from None
  if "reward_head" not in rm.params:
    raise InputError(f"--reward_model={args.reward_model}: its params have no 'reward_head' (a "
                     "reward model is trained with configs/rm.py)")
  # Completions are scored as the reward model was trained: its run's tokenizer and template.
  data_cfg = scoring.data_config([rm])
  rm_tok = jdata.make_tokenizer(data_cfg)
  encoder = jdata.Encoder(rm_tok, kind="sft", chat_template=data_cfg.chat_template,
                          loss_on="completion", max_len=data_cfg.max_len,
                          overlong=data_cfg.overlong)

  def model(idx, texts):
    seqs = []
    for i, text in zip(idx, texts):
      try:
        seqs.append(encoder.prompt_completion(rows[i]["prompt"], text)[0])
      except RowError as e:
        raise InputError(f"{wheres[i]}: cannot encode a completion for the reward model: "
                         f"{e}") from None
    # A chain scores every step: power-of-two widths keep the compiles few.
    scores = scoring.reward_scores(rm, seqs, args.batch_size, pow2_widths=True)
    return scores.astype(np.float64)

  return model


def _stopped(ids, eos_ids, stop_ids) -> bool:
  """Whether a completion ended by EOS / a stop sequence (what generate's `stopped` says for a
  fresh sample; recomputed because a chain's states are spliced from several samples)."""
  if not ids:
    return False
  return ids[-1] in eos_ids or any(len(ids) >= len(s) and tuple(ids[-len(s):]) == tuple(s)
                                   for s in stop_ids)


def run_qalign(args, prompts, model_cfg, params, sc, tokenizer, eos_ids, stop_ids, reward_fn,
               key) -> int:
  """One QAlign chain per (prompt, sample); --batch_size chains advance together."""
  import jax
  import numpy as np
  from jpost.rl import qalign
  from jpost.rl import rewards

  def decode(ids):
    return completion_text(tokenizer, ids, _stopped(ids, eos_ids, stop_ids), eos_ids, stop_ids,
                           args.stop)

  def vote_key(text):
    if args.qalign_vote == "text":
      return text.strip()
    answer = rewards.extract_answer(text)
    return None if answer is None else rewards.normalize_answer(answer)

  n = 0
  with open(args.out, "w", encoding="utf-8") as f:
    for b, batch in enumerate(_batches(prompts, args.num_samples, args.batch_size)):
      bkey = jax.random.fold_in(key, b)
      propose = qalign.make_proposal(model_cfg, params, [prompts[i][1] for i, _ in batch], sc,
                                     args.batch_size, bkey)
      y0s = propose(list(range(len(batch))), [()] * len(batch))   # the initial samples

      def chain_rewards(ids, ys):
        return reward_fn([batch[c][0] for c in ids], [decode(y)[0] for y in ys])

      chains = qalign.run_chains(propose, chain_rewards, y0s, args.qalign_steps,
                                 np.random.default_rng([args.seed, b]), args.qalign_beta)
      for (i, k), chain in zip(batch, chains):
        texts = [decode(y) for y in chain.states]
        keys = [vote_key(t) for t, _ in texts]
        winner, counts = qalign.majority_vote(keys)
        t = max(j for j, key_j in enumerate(keys) if key_j == winner)   # latest such state
        text, finished = texts[t]
        answer = rewards.extract_answer(text) if args.qalign_vote == "answer" else text
        row = dict(prompts[i][0], completion=text, num_tokens=len(chain.states[t]),
                   finished=finished, sample_index=k, qalign_answer=answer,
                   qalign_votes={"(none)" if key_j is None else key_j: c
                                 for key_j, c in counts.items()},
                   qalign_accept_rate=chain.accept_rate,
                   qalign_chain=[{"step": j, "completion": texts[j][0],
                                  "reward": chain.rewards[j]} for j in chain.accepted()])
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
