"""Fixtures for the data tests: tiny HF tokenizer directories built offline, JSONL writers."""
import json

import pytest

CORPUS = ["hello world", "what is 3+5?", "the answer is 8", "user assistant system",
          "hello there, how are you?", "I am fine. thanks", "<|im_start|> <|im_end|>",
          "[1] USER: \"hi\"", "ASSISTANT: yes"] * 3
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def base_tokenizer():
  """A byte-level BPE trained on a few strings; <s> is prepended by the post-processor."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


@pytest.fixture(scope="session")
def make_hf_dir(base_tokenizer, tmp_path_factory):
  """(template, eos, pad, ...) -> a saved tokenizer dir and the transformers tokenizer."""
  from transformers import PreTrainedTokenizerFast
  cache = {}

  def make(template, eos="<|im_end|>", pad="<pad>", bos="<s>"):
    key = (template, eos, pad, bos)
    if key not in cache:
      hf = PreTrainedTokenizerFast(tokenizer_object=base_tokenizer.__class__.from_str(
          base_tokenizer.to_str()), bos_token=bos, eos_token=eos, pad_token=pad,
          unk_token="<unk>", chat_template=template)
      path = tmp_path_factory.mktemp("tok")
      hf.save_pretrained(str(path))
      cache[key] = (str(path), hf)
    return cache[key]

  return make


@pytest.fixture
def write_jsonl(tmp_path):
  """(rows, name) -> path; rows are dicts (dumped) or raw strings (written verbatim)."""
  def write(rows, name="data.jsonl"):
    path = tmp_path / name
    with open(path, "w") as f:
      for row in rows:
        f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)
  return write


@pytest.fixture
def make_cfg():
  """**overrides -> a data config (jpost.data.config.default_config() updated)."""
  from jpost.data import config

  def make(**overrides):
    cfg = config.default_config()
    cfg.update(overrides)
    return cfg
  return make
