"""From sampled completions to the policy-gradient loss's batch (host side, numpy).

A rollout batch holds one sequence per row: the prompt, then the *response*, which is what the
loss trains on. A response is a generated completion, a demonstration (HPT / SRFT: trained with the
NLL term; LUFFY: with the offline ratio) or a demonstration prefix followed by the generated rest
(Prefix-RFT). Rows follow the layout of docs/architecture.md ("Batches"): positions from 0,
`targets` the next token, `loss_mask` on the positions whose target is a response token (the EOS
included), so `logps['policy'][b, t]` is the log-prob of the response token at t + 1.
"""
import dataclasses

import numpy as np

from jpost.data import batching

SOURCES = ("rollout", "demo_sft", "demo_offline")


@dataclasses.dataclass
class Response:
  prompt_ids: np.ndarray            # int32 [p]
  ids: np.ndarray                   # int32 [n]: the response tokens (EOS / stop tokens included)
  sampler_logp: np.ndarray | None   # float32 [n]: sampling log-probs (None for demonstrations);
                                    # 0 on a Prefix-RFT prefix, which the sampler did not generate
  source: str = "rollout"           # one of SOURCES
  prefix_len: int = 0               # leading demonstration tokens of a rollout (Prefix-RFT)
  stopped: bool = True              # ended with EOS / a stop sequence (False: cut at the limit)
  text: str = ""                    # the decoded response (what rewards read)

  def __post_init__(self):
    if self.source not in SOURCES:
      raise ValueError(f"Response.source={self.source!r}: expected one of {SOURCES}")


MIXING_KEYS = ("sft_mask", "offline_mask", "prefix_mask")


def build_batch(responses: list, max_len: int, mixing_keys=()) -> dict:
  """Rows `[prompt | response]` right-padded to `max_len`; None entries are padding rows.

  Keys: the token arrays of docs/architecture.md, `example_valid`, `sampler_logp` [B, T] (on the
  generated tokens), and `sft_mask`, `offline_mask`, `prefix_mask` when some row needs them or
  they are named in `mixing_keys` (a run names the keys its mixing can produce, so every batch
  has the same keys and the train step compiles once).
  """
  rows = len(responses)
  out = batching.empty_token_arrays(rows, max_len)
  out["example_valid"] = np.zeros(rows, np.float32)
  extra = {k: np.zeros((rows, max_len), np.float32)
           for k in ("sampler_logp",) + MIXING_KEYS}
  for i, r in enumerate(responses):
    if r is None:
      continue
    p, n = len(r.prompt_ids), len(r.ids)
    if n == 0:
      raise ValueError(f"row {i}: empty response (the sampler returns at least one token)")
    if p + n > max_len:
      raise ValueError(f"row {i}: prompt ({p}) + response ({n}) tokens exceed the rollout width "
                       f"{max_len}")
    ids = np.concatenate([r.prompt_ids, r.ids]).astype(np.int32)
    out["tokens"][i, :p + n] = ids
    out["targets"][i, :p + n - 1] = ids[1:]
    resp = slice(p - 1, p + n - 1)      # positions whose target is a response token
    out["loss_mask"][i, resp] = 1.0
    out["positions"][i, :p + n] = np.arange(p + n)
    out["segment_ids"][i, :p + n] = 1
    out["seq_index"][i, :p + n] = i
    out["example_valid"][i] = 1.0
    if r.sampler_logp is not None:
      extra["sampler_logp"][i, resp] = r.sampler_logp
    if r.source == "demo_sft":
      extra["sft_mask"][i, resp] = 1.0
    elif r.source == "demo_offline":
      extra["offline_mask"][i, resp] = 1.0
    if r.prefix_len:
      extra["prefix_mask"][i, p - 1:p - 1 + r.prefix_len] = 1.0
  out["sampler_logp"] = extra["sampler_logp"]
  for key in MIXING_KEYS:
    if key in mixing_keys or extra[key].any():
      out[key] = extra[key]
  return out


def left_pad(prompts: list, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Prompt id arrays -> (tokens [B, width] left-padded with 0, lengths [B]); None = padding row."""
  tokens = np.zeros((len(prompts), width), np.int32)
  lengths = np.zeros(len(prompts), np.int32)
  for i, ids in enumerate(prompts):
    if ids is None:
      continue
    if len(ids) > width:
      raise ValueError(f"prompt {i} has {len(ids)} tokens > sampler width {width}")
    tokens[i, width - len(ids):] = ids
    lengths[i] = len(ids)
  return tokens, lengths


def prompt_ids(batch: dict, padding: str) -> list:
  """The real prompt ids of each row of an RL prompt batch (None for padding rows)."""
  out = []
  for tokens, n, valid in zip(batch["prompt_tokens"], batch["prompt_lengths"],
                              batch["example_valid"]):
    if not valid:
      out.append(None)
    else:
      out.append(np.asarray(tokens[len(tokens) - n:] if padding == "left" else tokens[:n],
                            np.int32))
  return out


def pass_at_k(correct_PK) -> float:
  """Fraction of prompts with at least one correct of their k samples (pass@k with n = k)."""
  correct_PK = np.asarray(correct_PK, bool)
  return float(correct_PK.any(axis=1).mean()) if correct_PK.size else 0.0
