"""Tokenizers: a built-in byte tokenizer (the offline default) and HF `tokenizer.json` directories.

Both expose the same small surface the encoder needs:
  vocab_size, bos_id (or None), eos_id, pad_id, special_ids, special_tokens (name -> string, what a
  chat template sees as `bos_token`, `eos_token`, ...), chat_template (Jinja source or None),
  encode(text, add_special_tokens=True) -> ids, encode_with_char_map(text) -> (ids, char -> token),
  decode(ids, skip_special_tokens=True) -> str.
`encode(..., add_special_tokens=False)` is what transformers uses on rendered chat text (the
template writes the BOS itself); plain text is encoded with the tokenizer's own post-processor.
"""
import json
import os
import re

BYTE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class ByteTokenizer:
  """UTF-8 bytes (ids 3..258) after three specials: <pad>=0, <s>=1 (BOS), </s>=2 (EOS).

  Specials first so that padding id 0 (docs/architecture.md) is the pad token. The special strings
  are recognised inside text (like an HF tokenizer's added tokens), which is how the built-in chat
  template's `{{ eos_token }}` becomes the EOS id.
  """
  OFFSET = 3
  pad_id, bos_id, eos_id = 0, 1, 2
  vocab_size = 256 + OFFSET
  special_tokens = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
  _SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2}
  _SPLIT = re.compile("(<pad>|<s>|</s>)")

  def __init__(self):
    self.chat_template = BYTE_CHAT_TEMPLATE
    self.special_ids = frozenset(self._SPECIAL.values())
    self.name = "byte"

  def _pieces(self, text):
    for piece in self._SPLIT.split(text):
      if piece:
        yield piece, self._SPECIAL.get(piece)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [self.bos_id] if add_special_tokens else []
    for piece, special in self._pieces(text):
      ids.extend([special] if special is not None
                 else [b + self.OFFSET for b in piece.encode("utf-8")])
    return ids

  def encode_with_char_map(self, text: str):
    ids, char_to_token = [], []
    for piece, special in self._pieces(text):
      if special is not None:
        char_to_token.extend([len(ids)] * len(piece))
        ids.append(special)
        continue
      for ch in piece:
        char_to_token.append(len(ids))
        ids.extend(b + self.OFFSET for b in ch.encode("utf-8"))
    return ids, char_to_token

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    out, buf = [], bytearray()
    inverse = {v: k for k, v in self._SPECIAL.items()}
    for i in map(int, ids):
      if i >= self.OFFSET:
        buf.append(i - self.OFFSET)
        continue
      out.append(buf.decode("utf-8", errors="replace"))
      buf = bytearray()
      if not skip_special_tokens:
        out.append(inverse[i])
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
          "mask_token")


def _token_content(value):
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """A local HF tokenizer directory: tokenizer.json (+ tokenizer_config.json, chat_template.jinja).

  Special tokens come from tokenizer_config.json (legacy special_tokens_map.json is merged in, as
  transformers does); the chat template from tokenizer_config.json's `chat_template` (a string, or
  a list of named templates: 'default' is used) or from chat_template.jinja (transformers 5 writes
  it there). BOS handling is the tokenizer.json post-processor's, exactly what `tokenizer(text)`
  does in transformers.
  """

  def __init__(self, path: str):
    import tokenizers   # the Rust tokenizers library, no transformers needed
    self.name = path
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_file):
      raise FileNotFoundError(f"tokenizer {path!r}: no tokenizer.json (only fast HF tokenizers "
                              "are supported)")
    self._tok = tokenizers.Tokenizer.from_file(tok_file)
    # tokenizer.json may carry truncation / padding settings; transformers overrides them per
    # call, and a silent cut here would shift the completion mask.
    self._tok.no_truncation()
    self._tok.no_padding()
    config = self._read_json(os.path.join(path, "tokenizer_config.json")) or {}
    legacy = self._read_json(os.path.join(path, "special_tokens_map.json")) or {}
    self.special_tokens = {}
    for key in _NAMED:
      value = _token_content(config.get(key, legacy.get(key)))
      if value is not None:
        self.special_tokens[key] = str(value)
    ids = {}
    for key, content in self.special_tokens.items():
      ids[key] = self._tok.token_to_id(content)
      if ids[key] is None:
        raise ValueError(f"tokenizer {path!r}: {key} {content!r} from tokenizer_config.json is "
                         "not in tokenizer.json's vocabulary")
    if "eos_token" not in ids:
      raise ValueError(f"tokenizer {path!r}: tokenizer_config.json names no eos_token; training "
                       "needs one to end completions")
    self.eos_id = ids["eos_token"]
    self.bos_id = ids.get("bos_token")
    self.pad_id = ids.get("pad_token", self.eos_id)   # pad == eos is common and handled
    added = self._tok.get_added_tokens_decoder()
    self.special_ids = frozenset([i for i, t in added.items() if t.special] + list(ids.values()))
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                          max(vocab.values()) + 1)
    self.chat_template = self._chat_template(path, config)

  @staticmethod
  def _read_json(path):
    if not os.path.exists(path):
      return None
    with open(path, encoding="utf-8") as f:
      return json.load(f)

  @staticmethod
  def _chat_template(path, config):
    template = config.get("chat_template")
    if isinstance(template, list):   # [{'name': ..., 'template': ...}, ...]
      named = {t["name"]: t["template"] for t in template}
      if "default" not in named:
        raise ValueError(f"tokenizer {path!r} has several chat templates "
                         f"({', '.join(sorted(named))}) and none named 'default'")
      template = named["default"]
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        template = f.read()
    return template

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_with_char_map(self, text: str):
    enc = self._tok.encode(text, add_special_tokens=False)
    return enc.ids, [enc.char_to_token(c) for c in range(len(text))]

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def make_tokenizer(data_cfg):
  """`data.tokenizer`: 'byte' or 'hf:DIR'."""
  spec = data_cfg.tokenizer
  if spec == "byte":
    return ByteTokenizer()
  if spec.startswith("hf:"):
    return HFTokenizer(os.path.expanduser(spec[3:]))
  raise ValueError(f"data.tokenizer={spec!r}: expected 'byte' or 'hf:DIR'")
