"""Validated rows -> token sequences with per-token training masks, and the over-length policy.

A `Seq` holds `ids` [n] and `mask` [n] where `mask[j] = 1` means token j is trained on (predicted
from ids[:j]); mask[0] is always 0. EOS / end-of-turn tokens of the trained part are in the mask.
The mask is built from token positions, never by comparing ids with the pad id, so a tokenizer with
pad == eos never loses its real EOS. `prompt_len` counts the leading context tokens: the prompt of
a prompt/completion row, everything before the last trained turn of a conversation, 0 when every
token is trained (`text`). `truncate_left` may only cut inside that context.

Conversations follow TRL: the prompt is rendered with `add_generation_prompt=True`, prompt +
completion without, and the tokenised prompt must be a prefix of the tokenised whole (else the
row is rejected: its completion mask would be wrong). Assistant-only masks use the template's
`{% generation %}` spans when it has them (as transformers' `return_assistant_tokens_mask`),
otherwise each assistant turn is located by rendering the conversation up to it; such a span
ends at the turn's last special token (its end-of-turn), leaving template whitespace untrained.
"""
from typing import NamedTuple

import numpy as np

from jpost.data import chat_template as ct
from jpost.data.schema import RowError


class Seq(NamedTuple):
  ids: np.ndarray      # int32 [n]
  mask: np.ndarray     # int8 [n]
  prompt_len: int


def _seq(ids, mask, prompt_len) -> Seq:
  mask = np.asarray(mask, np.int8)
  if len(mask):
    mask[0] = 0
  return Seq(np.asarray(ids, np.int32), mask, int(prompt_len))


class Encoder:
  """Turns validated rows (schema.validate) of one data kind into sequences that fit `max_len`."""

  def __init__(self, tokenizer, *, kind: str, chat_template: bool, loss_on: str, max_len: int,
               overlong: str, max_prompt_len: int = 0):
    self.tok = tokenizer
    self.kind = kind
    self.chat = bool(chat_template)
    # Preference objectives compare completion log-probs: a prompt's assistant turns (or the
    # prompt itself) must not enter the sums, whatever `loss_on` says for SFT.
    self.loss_on = "completion" if kind in ("pairwise", "unpaired") else loss_on
    self.max_len = int(max_len)
    self.overlong = overlong
    self.max_prompt_len = int(max_prompt_len) or int(max_len)

  # --- entry point ---------------------------------------------------------------------------
  def encode(self, row: dict) -> tuple[list[Seq], bool]:
    """-> (sequences, truncated): [seq] (sft, unpaired), [chosen, rejected], [prompt] (rl)."""
    if self.kind == "rl":
      return self._rl_prompt(row["prompt"])
    if self.kind == "pairwise":
      return self._fit([self._prompt_completion(row["prompt"], row["chosen"]),
                        self._prompt_completion(row["prompt"], row["rejected"])])
    if "messages" in row:
      return self._fit([self._messages(row["messages"])])
    if "text" in row:
      return self._fit([self._text(row["text"])])
    return self._fit([self._prompt_completion(row["prompt"], row["completion"])])

  def prompt_completion(self, prompt, completion) -> tuple[Seq, bool]:
    """One prompt + completion (e.g. an RL demonstration) as a training sequence."""
    seqs, truncated = self._fit([self._prompt_completion(prompt, completion)])
    return seqs[0], truncated

  # --- templates -------------------------------------------------------------------------------
  def _template(self) -> str:
    if not self.tok.chat_template:
      raise RowError("no_chat_template", f"tokenizer {self.tok.name!r} has no chat template but "
                     "the row is conversational (or data.chat_template is set)")
    return self.tok.chat_template

  def _render_ids(self, messages, add_generation_prompt) -> list[int]:
    try:
      text = ct.render(self._template(), messages, add_generation_prompt=add_generation_prompt,
                       special_tokens=self.tok.special_tokens)
    except RowError:
      raise
    except Exception as e:   # a template's raise_exception() or a Jinja error names the cause
      raise RowError("template_error", f"chat template failed: {type(e).__name__}: {e}") from None
    return self.tok.encode(text, add_special_tokens=False)

  def _check_prefix(self, prefix, full, what):
    if full[:len(prefix)] != prefix:
      k = next(i for i, (a, b) in enumerate(zip(prefix, full + [None] * len(prefix))) if a != b)
      raise RowError("prompt_boundary", f"the tokenised {what} is not a prefix of the tokenised "
                     f"whole at token {k}: {self.tok.decode(prefix[k:k + 3], False)!r} vs "
                     f"{self.tok.decode(full[k:k + 3], False)!r} (the text on either side of "
                     "the boundary merges into one token)")

  def _trim_to_special(self, ids, start, end) -> int:
    """End of a turn's trained span: just after its last special token (end-of-turn)."""
    for j in range(end - 1, start - 1, -1):
      if ids[j] in self.tok.special_ids:
        return j + 1
    return end

  # --- row styles ------------------------------------------------------------------------------
  def _text(self, text) -> Seq:
    ids = self.tok.encode(text, add_special_tokens=True)
    if ids[-1] != self.tok.eos_id:
      ids.append(self.tok.eos_id)
    return _seq(ids, np.ones(len(ids)), 0)

  def _as_messages(self, prompt, completion):
    pm = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    cm = completion if isinstance(completion, list) else [{"role": "assistant",
                                                           "content": completion}]
    return pm, cm

  def _prompt_completion(self, prompt, completion) -> Seq:
    if isinstance(prompt, list) or self.chat:
      pm, cm = self._as_messages(prompt, completion)
      if self.loss_on == "assistant":
        return self._assistant(pm + cm)
      p_ids = self._render_ids(pm, True)
      ids = self._render_ids(pm + cm, False)
      self._check_prefix(p_ids, ids, "prompt (with generation prompt)")
      end = self._trim_to_special(ids, len(p_ids), len(ids))
    else:
      p_ids = self.tok.encode(prompt, add_special_tokens=True)
      ids = self.tok.encode(prompt + completion, add_special_tokens=True)
      self._check_prefix(p_ids, ids, "prompt")
      if ids[-1] != self.tok.eos_id:
        ids.append(self.tok.eos_id)
      end = len(ids)
    if len(ids) == len(p_ids):
      raise RowError("empty_field", "the completion encodes to no tokens")
    mask = np.zeros(len(ids))
    mask[len(p_ids):end] = 1
    if self.loss_on == "all":
      mask[:] = 1
    return _seq(ids, mask, len(p_ids))

  def _messages(self, messages) -> Seq:
    if self.loss_on == "all":
      ids = self._render_ids(messages, False)
      return _seq(ids, np.ones(len(ids)), 0)
    if self.loss_on == "assistant":
      return self._assistant(messages)
    # 'completion': the trailing assistant turn(s) after the last non-assistant message.
    k = len(messages)
    while k > 0 and messages[k - 1]["role"] == "assistant":
      k -= 1
    if k == len(messages):
      raise RowError("no_assistant_turn", "'messages' does not end with an assistant turn "
                     "(loss_on='completion' trains on the final assistant turn)")
    if k == 0:
      return self._assistant(messages)
    return self._prompt_completion(messages[:k], messages[k:])

  def _assistant(self, messages) -> Seq:
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
      raise RowError("no_assistant_turn", "no assistant message to train on")
    template = self._template()
    if ct.has_generation_tags(template):
      text, spans = ct.render(template, messages, add_generation_prompt=False,
                              special_tokens=self.tok.special_tokens, with_spans=True)
      ids, char_to_token = self.tok.encode_with_char_map(text)
      mask = np.zeros(len(ids))
      for start_char, end_char in spans:   # transformers' char -> token rule, verbatim
        if end_char <= start_char:
          continue
        start, end = char_to_token[start_char], char_to_token[end_char - 1]
        if start is None:
          break
        mask[start:(end + 1 if end else len(ids))] = 1
    else:
      ids = self._render_ids(messages, False)
      mask = np.zeros(len(ids))
      for i in turns:
        start = 0
        if i > 0:
          before = self._render_ids(messages[:i], True)
          self._check_prefix(before, ids, f"conversation before assistant turn {i}")
          start = len(before)
        upto = self._render_ids(messages[:i + 1], False)
        self._check_prefix(upto, ids, f"conversation up to assistant turn {i}")
        mask[start:self._trim_to_special(ids, start, len(upto))] = 1
    if not mask[1:].any():
      raise RowError("empty_field", "the assistant turns encode to no tokens")
    # The context before the last trained run (the final assistant turn) is what
    # truncate_left may cut.
    start = int(np.flatnonzero(mask)[-1])
    while start > 1 and mask[start - 1]:
      start -= 1
    return _seq(ids, mask, start)

  def _rl_prompt(self, prompt):
    if isinstance(prompt, list) or self.chat:
      pm = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
      ids = self._render_ids(pm, True)
    else:
      ids = self.tok.encode(prompt, add_special_tokens=True)
    limit = self.max_prompt_len
    if len(ids) <= limit:
      return [_seq(ids, np.zeros(len(ids)), len(ids))], False
    if self.overlong == "drop":
      raise RowError("overlong", f"prompt has {len(ids)} tokens > {limit}")
    b = 1 if self.tok.bos_id is not None and ids[0] == self.tok.bos_id else 0
    ids = ids[:b] + ids[len(ids) - limit + b:] if self.overlong == "truncate_left" else ids[:limit]
    return [_seq(ids, np.zeros(len(ids)), len(ids))], True

  # --- over-length policy ----------------------------------------------------------------------
  def _fit(self, seqs: list[Seq]) -> tuple[list[Seq], bool]:
    limit = self.max_len
    n = max(len(s.ids) for s in seqs)
    if n <= limit:
      return seqs, False
    if self.overlong == "drop":
      raise RowError("overlong", f"{n} tokens > max_len {limit}")
    out = []
    if self.overlong == "truncate_right":
      out = [_seq(s.ids[:limit], s.mask[:limit], min(s.prompt_len, limit)) for s in seqs]
    else:
      # One cut for every sequence of the row, so a pair keeps one identical prompt.
      cut = n - limit
      for s in seqs:
        b = 1 if self.tok.bos_id is not None and s.ids[0] == self.tok.bos_id else 0
        c = len(s.ids) - limit if s.prompt_len == 0 else cut   # text: everything is trainable
        if c > 0 and s.prompt_len and c > s.prompt_len - b:
          raise RowError("overlong", f"{n} tokens > max_len {limit} and truncate_left may cut "
                         f"only the prompt ({s.prompt_len - b} tokens), not the completion")
        c = max(c, 0)
        keep = np.r_[0:b, b + c:len(s.ids)].astype(int)
        out.append(_seq(s.ids[keep], s.mask[keep], max(s.prompt_len - c, 0)))
    if any(not s.mask.any() for s in out):
      raise RowError("overlong", f"{n} tokens > max_len {limit}: no trained token is left after "
                     f"{self.overlong}")
    return out, True
