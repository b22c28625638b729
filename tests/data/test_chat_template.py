"""HF tokenizers and chat templates against transformers' own `apply_chat_template`."""
import json
import os
import shutil

import numpy as np
import pytest

from jpost.data import chat_template as ct
from jpost.data.encode import Encoder
from jpost.data.schema import RowError
from jpost.data.tokenizer import HFTokenizer

from tiny_templates import CHATML, CHATML_GENERATION, FANCY

SINGLE = [{"role": "user", "content": "what is 3+5?"}]
MULTI = [{"role": "system", "content": "I am fine."},
         {"role": "user", "content": "hello there, how are you?"},
         {"role": "assistant", "content": "I am fine. thanks"},
         {"role": "user", "content": "what is 3+5?"},
         {"role": "assistant", "content": "the answer is 8"}]


def _encoder(tok, loss_on="assistant", chat=False, max_len=512):
  return Encoder(tok, kind="sft", chat_template=chat, loss_on=loss_on, max_len=max_len,
                 overlong="drop")


def _runs(mask):
  """[(start, end)] of the runs of ones in a 0/1 vector."""
  padded = np.r_[0, np.asarray(mask, int), 0]
  edges = np.flatnonzero(np.diff(padded))
  return list(zip(edges[0::2], edges[1::2]))


@pytest.mark.parametrize("template,eos", [(CHATML, "<|im_end|>"), (CHATML_GENERATION, "<|im_end|>"),
                                          (FANCY, "</s>")], ids=["chatml", "generation", "fancy"])
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_and_ids_equal_apply_chat_template(make_hf_dir, template, eos, messages,
                                                  add_generation_prompt):
  path, hf = make_hf_dir(template, eos=eos)
  tok = HFTokenizer(path)
  text = ct.render(tok.chat_template, messages, add_generation_prompt=add_generation_prompt,
                   special_tokens=tok.special_tokens)
  assert text == hf.apply_chat_template(messages, tokenize=False,
                                        add_generation_prompt=add_generation_prompt)
  ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                               add_generation_prompt=add_generation_prompt)
  assert tok.encode(text, add_special_tokens=False) == list(ids)


def test_special_tokens_and_plain_text_follow_the_saved_files(make_hf_dir):
  path, hf = make_hf_dir(CHATML, eos="<|im_end|>", pad="<pad>")
  tok = HFTokenizer(path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id,
                                                  hf.pad_token_id)
  assert tok.vocab_size == len(hf)
  # Plain text goes through tokenizer.json's post-processor (the BOS), like tokenizer(text).
  assert tok.encode("hello world") == hf("hello world")["input_ids"]
  assert tok.encode("hello world")[0] == tok.bos_id


def test_generation_spans_give_transformers_assistant_mask(make_hf_dir):
  path, hf = make_hf_dir(CHATML_GENERATION)
  tok = HFTokenizer(path)
  seq = _encoder(tok)._messages(MULTI)
  out = hf.apply_chat_template(MULTI, tokenize=True, return_dict=True,
                               return_assistant_tokens_mask=True)
  assert list(seq.ids) == list(out["input_ids"])
  np.testing.assert_array_equal(seq.mask, out["assistant_masks"])


def test_prefix_rendering_masks_exactly_the_assistant_turns(make_hf_dir):
  path, hf = make_hf_dir(CHATML)
  tok = HFTokenizer(path)
  seq = _encoder(tok)._messages(MULTI)
  turns = [tok.decode(seq.ids[a:b], skip_special_tokens=False) for a, b in _runs(seq.mask)]
  assert turns == [m["content"] + "<|im_end|>" for m in MULTI if m["role"] == "assistant"]
  # The same text under the {% generation %} twin of the template: transformers' mask agrees.
  _, hf_gen = make_hf_dir(CHATML_GENERATION)
  ref = hf_gen.apply_chat_template(MULTI, tokenize=True, return_dict=True,
                                   return_assistant_tokens_mask=True)
  np.testing.assert_array_equal(seq.mask, ref["assistant_masks"])
  # truncate_left may cut only what precedes the last assistant turn.
  assert tok.decode(seq.ids[seq.prompt_len:], False) == "the answer is 8<|im_end|>\n"


def test_conversational_prompt_completion_masks_the_completion(make_hf_dir):
  path, hf = make_hf_dir(CHATML)
  tok = HFTokenizer(path)
  completion = [{"role": "assistant", "content": "the answer is 8"}]
  seq = _encoder(tok, loss_on="completion")._prompt_completion(SINGLE, completion)
  prompt_ids = hf.apply_chat_template(SINGLE, add_generation_prompt=True, return_dict=False)
  full_ids = hf.apply_chat_template(SINGLE + completion, return_dict=False)
  assert list(seq.ids) == list(full_ids)
  assert seq.prompt_len == len(prompt_ids)
  assert _runs(seq.mask) == [(len(prompt_ids), len(full_ids) - 1)]   # the final "\n" untrained
  assert tok.decode(seq.ids[seq.mask == 1], False) == "the answer is 8<|im_end|>"
  # messages + loss_on='completion' trains on the final assistant turn only.
  last = _encoder(tok, loss_on="completion")._messages(MULTI)
  assert tok.decode(last.ids[last.mask == 1], False) == "the answer is 8<|im_end|>"


def test_plain_strings_through_the_template_when_configured(make_hf_dir):
  path, hf = make_hf_dir(CHATML)
  tok = HFTokenizer(path)
  seqs, _ = _encoder(tok, loss_on="completion", chat=True).encode(
      {"prompt": "what is 3+5?", "completion": "the answer is 8"})
  expected = hf.apply_chat_template(SINGLE + [{"role": "assistant", "content": "the answer is 8"}],
                                    return_dict=False)
  assert list(seqs[0].ids) == list(expected)


def test_prompt_that_is_not_a_token_prefix_is_rejected(make_hf_dir):
  path, hf = make_hf_dir(CHATML)
  tok = HFTokenizer(path)
  assert len(hf.tokenize("hello")) == 1   # so "hel" + "lo world" merges across the boundary
  with pytest.raises(RowError, match="not a prefix") as e:
    _encoder(tok, loss_on="completion").encode({"prompt": "hel", "completion": "lo world"})
  assert e.value.reason == "prompt_boundary"


def test_template_errors_name_the_cause(make_hf_dir):
  path, _ = make_hf_dir(FANCY, eos="</s>")
  tok = HFTokenizer(path)
  bad = [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "yes"}]
  with pytest.raises(RowError, match="unknown role robot") as e:
    _encoder(tok)._messages(bad)
  assert e.value.reason == "template_error"


def test_environment_globals_match_transformers(make_hf_dir):
  template = ("{{ strftime_now('%Y') }}|{{ messages[0] | tojson }}|{% set d = dict(a=1) %}"
              "{{ d.a }}|{% for m in messages %}{% if loop.first %}{% break %}{% endif %}x"
              "{% endfor %}")
  _, hf = make_hf_dir(template)
  msgs = [{"role": "user", "content": "<b>é</b>"}]
  assert ct.render(template, msgs, add_generation_prompt=False, special_tokens={}) == \
      hf.apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("form", ["string", "named_list"])
def test_template_read_from_tokenizer_config(make_hf_dir, tmp_path, form):
  path, _ = make_hf_dir(CHATML)
  copy = tmp_path / "tok"
  shutil.copytree(path, copy)
  os.remove(copy / "chat_template.jinja")
  cfg = json.loads((copy / "tokenizer_config.json").read_text())
  cfg["chat_template"] = CHATML if form == "string" else [
      {"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]
  (copy / "tokenizer_config.json").write_text(json.dumps(cfg))
  assert HFTokenizer(str(copy)).chat_template == CHATML


def test_preference_sequences_score_only_the_completion(make_hf_dir):
  path, _ = make_hf_dir(CHATML)
  tok = HFTokenizer(path)
  enc = Encoder(tok, kind="pairwise", chat_template=False, loss_on="assistant", max_len=512,
                overlong="drop")
  (chosen, rejected), _ = enc.encode({
      "prompt": MULTI[:4], "chosen": [{"role": "assistant", "content": "the answer is 8"}],
      "rejected": [{"role": "assistant", "content": "hello"}]})
  assert tok.decode(chosen.ids[chosen.mask == 1], False) == "the answer is 8<|im_end|>"
  assert tok.decode(rejected.ids[rejected.mask == 1], False) == "hello<|im_end|>"
