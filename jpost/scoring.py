"""Scoring JSONL rows with a trained reward model or an implicit process reward model (PRM).

Rows: `prompt` + `completion` (also `messages` / `text`, as SFT data) or `prompt` + `chosen` +
`rejected`. They are validated and encoded exactly as training encodes them (jpost.data: the
schema, `Encoder`, the run's tokenizer and chat-template settings; the loss mask is the
completion), then batched into static [batch_size, T] shapes, so each model compiles once.

Reward model (`reward_scores`): a jpost workdir whose params hold a `reward_head` (objective
`rm_bt`); the score is the head on the last token's hidden state (the EOS), as in training.

Implicit PRM (`prm_scores`, ALGORITHMS.md §3): per completion token t the reward is
beta * (log pi(y_t) - log pi_ref(y_t)); step k's reward is the sum over its tokens; a response
gets `step_scores`, their `min` and their `sum` (= beta * (S_theta - S_ref), the sequence-level
implicit reward). Steps are the pieces of the decoded completion split by a delimiter (default
"\\n\\n"); a delimiter belongs to the step it ends. A token belongs to the step holding its first
character, found by decoding the completion incrementally (`token_char_starts`). With the byte
tokenizer every character is its own token(s), so the split is exact. With a BPE tokenizer a token
may straddle a boundary (e.g. "\\n\\nThe" as one token): it goes wholly to the step of its first
character, here the step the delimiter ends, so that step also gets "The"'s reward (a merge like
"b.\\n\\n" that ends at the boundary is exact). Tokens that decode to no text (EOS, end-of-turn
specials) join the previous token's step.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jpost import data as jdata
from jpost import models
from jpost.models import resolve
from jpost.data import batching, schema, sources
from jpost.data.schema import DataError, RowError
from jpost.train import forward

DEFAULT_DELIMITER = "\n\n"
DEFAULT_PRM_BETA = 0.05   # ALGORITHMS.md §3, implicit_prm
PAIR_FIELDS = ("chosen", "rejected")
MAX_REPORTED = 20


# ------------------------------------------------------------------------------------- models

@dataclasses.dataclass
class Model:
  cfg: models.ModelConfig
  params: dict              # {'lm': ..., optional 'reward_head': ...}
  run_config: dict | None   # the training run's config.json (jpost workdirs), else None
  source: str               # the path as given
  kind: str = "jpost"       # 'jpost' | 'hf' (jpost.models.resolve)


def load_model(spec: str, dtype: str | None = None) -> Model:
  """A model path as `jpost.models.resolve` reads it: `hf:DIR`, a jpost workdir (`ckpt:` prefix
  optional) or an HF directory."""
  source = resolve.resolve(spec)
  cfg, params = resolve.load(source, dtype)
  run_config = source.run_config() if source.kind == "jpost" else None
  params = jax.tree.map(jnp.asarray, dict(params))
  return Model(cfg, params, run_config or None, spec, source.kind)


def data_config(loaded: list, tokenizer: str | None = None, max_len: int | None = None):
  """Encoding settings for scoring with `loaded` models: those of the first one trained by jpost
  (its config.json `data` section), else the defaults with the first `hf:DIR` model's tokenizer;
  `tokenizer` and `max_len` override."""
  cfg = jdata.config.default_config()
  run = next((m for m in loaded if m.run_config), None)
  if run is not None:
    saved = run.run_config.get("data", {})
    for key in ("tokenizer", "chat_template", "max_len", "overlong", "max_prompt_len"):
      if key in saved:
        cfg[key] = saved[key]
  else:
    hf = next((m for m in loaded if m.kind == "hf"), None)
    if hf is not None:
      # A Hugging Face model directory normally has its tokenizer.
      cfg.tokenizer = hf.source if hf.source.startswith("hf:") else f"hf:{hf.source}"
  if tokenizer:
    cfg.tokenizer = tokenizer
  if max_len:
    cfg.max_len = max_len
  if cfg.overlong == "drop":
    # Scoring never drops a row silently: keep the completion, cut the oldest prompt tokens.
    cfg.overlong = "truncate_left"
  return cfg


# --------------------------------------------------------------------------------------- rows

@dataclasses.dataclass
class Item:
  where: str                # path:line
  row: dict                 # the row as read (written back with the scores added)
  fields: list              # [(output suffix, Seq)]: [('', seq)] or [('_chosen', ..), ...]


def encode_file(path: str, tokenizer, data_cfg) -> list[Item]:
  """Reads, validates and encodes every row; all bad rows are reported together (path:line:
  reason naming the field)."""
  pair_encoder = jdata.Encoder(tokenizer, kind="pairwise", chat_template=data_cfg.chat_template,
                               loss_on="completion", max_len=data_cfg.max_len,
                               overlong=data_cfg.overlong)
  one_encoder = jdata.Encoder(tokenizer, kind="sft", chat_template=data_cfg.chat_template,
                              loss_on="completion", max_len=data_cfg.max_len,
                              overlong=data_cfg.overlong)
  items, errors = [], []
  for where, row in sources.iter_rows(f"jsonl:{path}", "sft"):
    try:
      if isinstance(row, RowError):
        raise row
      if any(f in row for f in PAIR_FIELDS):
        seqs, _ = pair_encoder.encode(schema.validate(row, "pairwise"))
        fields = [("_" + f, s) for f, s in zip(PAIR_FIELDS, seqs)]
      else:
        seqs, _ = one_encoder.encode(schema.validate(row, "sft"))
        fields = [("", seqs[0])]
    except RowError as e:
      errors.append(f"{where}: {e}")
      continue
    items.append(Item(where, row, fields))
  if errors:
    more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
    raise DataError(f"{len(errors)} row(s) of {path} cannot be scored:\n  "
                    + "\n  ".join(errors[:MAX_REPORTED]) + more)
  if not items:
    raise DataError(f"{path}: no rows to score")
  return items


def _batches(seqs, batch_size, pow2_widths=False):
  """Static-shape unpacked batches: [batch_size, T], T = the longest sequence rounded up to 8
  (or to a power of two >= 16, for callers that score many small sets, like a QAlign chain:
  fewer distinct widths, fewer compiles)."""
  longest = max(len(s.ids) for s in seqs)
  width = max(16, 1 << (longest - 1).bit_length()) if pow2_widths else -(-longest // 8) * 8
  for start in range(0, len(seqs), batch_size):
    chunk = [[s] for s in seqs[start:start + batch_size]]
    n = len(chunk)
    chunk += [None] * (batch_size - n)
    yield batching.unpacked_batch(chunk, width, 1), n


# ------------------------------------------------------------------------------------- forward

@functools.lru_cache(maxsize=16)
def _forward_fn(spec: forward.ForwardSpec, output: str):
  """One jitted forward per (spec, output), so repeated calls (a QAlign chain, many files) reuse
  the compiled executable instead of tracing a new lambda each time."""
  return jax.jit(lambda p, b: forward.compute_logps(spec, p, None, b)[output])


def reward_scores(model: Model, seqs, batch_size: int = 16, *,
                  pow2_widths: bool = False) -> np.ndarray:
  """Reward-head score of each sequence -> [N] float32 (the training forward's reward branch)."""
  if "reward_head" not in model.params:
    trained = (model.run_config or {}).get("objective", {}).get("name", "?")
    raise ValueError(f"{model.source}: its params have no 'reward_head' (objective {trained!r}); "
                     "a reward model is trained with configs/rm.py. For an implicit PRM pass "
                     "--ref as well")
  fn = _forward_fn(forward.ForwardSpec(model_cfg=model.cfg, head="reward"), "reward")
  out = [np.asarray(fn(model.params, b))[:n]
         for b, n in _batches(seqs, batch_size, pow2_widths)]
  return np.concatenate(out).astype(np.float32)


def token_logprobs(model: Model, seqs, batch_size: int = 16, impl: str = "auto") -> list:
  """log p(ids[j] | ids[:j]) of each sequence's trained tokens -> per sequence an [n] float32
  array aligned with `ids` (0 where mask is 0, so at j = 0 too)."""
  fn = _forward_fn(forward.ForwardSpec(model_cfg=model.cfg, impl=impl), "policy")
  out = []
  for b, n in _batches(seqs, batch_size):
    lp_BT = np.asarray(fn(model.params, b))
    for i in range(n):
      # Position t of the row predicts token t + 1 (targets[t] = ids[t + 1]).
      m = len(seqs[len(out)].ids)
      out.append(np.concatenate([[0.0], lp_BT[i, :m - 1]]).astype(np.float32))
  return out


# ------------------------------------------------------------------------------------- steps

def token_char_starts(tokenizer, ids) -> tuple[str, np.ndarray, np.ndarray]:
  """Decodes `ids` incrementally -> (text, start [n], width [n]): token j's text begins at
  text[start[j]] and adds width[j] characters. Width 0: a special token (skipped by decode), or
  a later piece of a multi-byte character split over tokens (the prefix ending inside it decodes
  to one replacement character, so the character is credited to its first token)."""
  text = tokenizer.decode(ids)
  starts, widths, prev = [], [], 0
  for j in range(len(ids)):
    cur = len(tokenizer.decode(ids[:j + 1]))
    # A prefix ending inside a multi-byte character decodes to a replacement char: clamp so the
    # offsets stay monotone and within the full text.
    cur = min(max(cur, prev), len(text))
    starts.append(prev)
    widths.append(cur - prev)
    prev = cur
  return text, np.asarray(starts, np.int64), np.asarray(widths, np.int64)


def step_ids(tokenizer, seq, delimiter: str = DEFAULT_DELIMITER) -> np.ndarray:
  """Step number of each token of `seq` -> [n] int32, -1 outside the completion (mask 0).

  The completion (the trained tokens) is decoded; step k spans from the end of the k-th delimiter
  occurrence (or the start) through the end of the (k+1)-th. See the module docstring for tokens
  that straddle a boundary or decode to nothing.
  """
  if not delimiter:
    raise ValueError("the step delimiter is empty")
  idx = np.flatnonzero(seq.mask)
  out = np.full(len(seq.ids), -1, np.int32)
  if not len(idx):
    return out
  text, starts, widths = token_char_starts(tokenizer, [int(i) for i in seq.ids[idx]])
  ends, at = [], text.find(delimiter)
  while at >= 0:               # non-overlapping occurrences, left to right (str.split's rule)
    ends.append(at + len(delimiter))
    at = text.find(delimiter, at + len(delimiter))
  # A character at offset c is in step (number of delimiter ends <= c); a token is in the step
  # of its first character.
  steps = np.searchsorted(np.asarray(ends, np.int64), starts, side="right").astype(np.int32)
  # A token that decodes to nothing (EOS, end of turn) ends the text before it: it joins the
  # previous token's step rather than opening a step of its own.
  for j in range(1, len(steps)):
    if widths[j] == 0:
      steps[j] = steps[j - 1]
  out[idx] = steps
  return out


def prm_scores(lp, ref, seq, steps, beta: float) -> dict:
  """One response's implicit-PRM scores from aligned token log-probs [n] and step ids [n]."""
  r = beta * (lp - ref) * seq.mask
  inside = steps >= 0
  if not inside.any():
    return {"step_scores": [], "min": 0.0, "sum": 0.0}
  # Renumber the steps that hold tokens 0, 1, ... (a delimiter-only piece keeps its number only
  # if a token starts in it).
  _, dense = np.unique(steps[inside], return_inverse=True)
  per_step = np.bincount(dense, weights=r[inside].astype(np.float64))
  return {"step_scores": [float(x) for x in per_step], "min": float(per_step.min()),
          "sum": float(per_step.sum())}


# ---------------------------------------------------------------------------------- end to end

def score_rm(items, model, *, batch_size=16):
  seqs = [s for item in items for _, s in item.fields]
  scores = iter(reward_scores(model, seqs, batch_size).tolist())
  return [dict(item.row, **{f"score{suffix}": next(scores) for suffix, _ in item.fields})
          for item in items]


def score_prm(items, policy, ref, tokenizer, *, beta, delimiter=DEFAULT_DELIMITER,
              batch_size=16, impl="auto"):
  seqs = [s for item in items for _, s in item.fields]
  lp = token_logprobs(policy, seqs, batch_size, impl)
  lp_ref = token_logprobs(ref, seqs, batch_size, impl)
  out, k = [], 0
  for item in items:
    row = dict(item.row)
    for suffix, seq in item.fields:
      s = prm_scores(lp[k], lp_ref[k], seq, step_ids(tokenizer, seq, delimiter), beta)
      row.update({f"{name}{suffix}": value for name, value in s.items()})
      k += 1
    out.append(row)
  return out


def parse_delimiter(text: str) -> str:
  """A delimiter as typed on a command line: backslash escapes (\\n, \\t, \\u00a7) decoded,
  other characters (any script) kept as they are."""
  return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def prm_beta(policy: Model, beta: float | None) -> float:
  """--beta, else the policy run's objective.beta when it trained implicit_prm, else 0.05."""
  if beta is not None:
    return float(beta)
  objective = (policy.run_config or {}).get("objective", {})
  if objective.get("name") == "implicit_prm" and "beta" in objective:
    return float(objective["beta"])
  return DEFAULT_PRM_BETA
