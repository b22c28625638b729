"""Loss masks in finished batches: completion-only, EOS trained, pad == eos, assistant turns."""
import numpy as np

from jpost.data import make_tokenizer, make_train_iterator
from jpost.data.tokenizer import ByteTokenizer

from tiny_templates import CHATML


def _first_batch(cfg, kind="sft", batch_size=1):
  tok = make_tokenizer(cfg)
  return tok, next(make_train_iterator(cfg, kind, tok, batch_size=batch_size, seed=0))


def _trained_targets(batch, row=0):
  return batch["targets"][row][batch["loss_mask"][row] == 1]


def test_completion_only_mask_includes_eos(make_cfg, write_jsonl):
  path = write_jsonl([{"prompt": "12+30=", "completion": "42"}])
  tok, b = _first_batch(make_cfg(train=path, max_len=16))
  ids = [1] + [c + ByteTokenizer.OFFSET for c in b"12+30=42"] + [2]
  n = len(ids)
  np.testing.assert_array_equal(b["tokens"][0], ids + [0] * (16 - n))
  np.testing.assert_array_equal(b["targets"][0], ids[1:] + [0] * (17 - n))
  # Trained: the targets "4", "2" and EOS, i.e. the inputs at positions of "=", "4", "2".
  expected = np.zeros(16)
  expected[n - 4:n - 1] = 1
  np.testing.assert_array_equal(b["loss_mask"][0], expected)
  assert tok.decode(_trained_targets(b), skip_special_tokens=False) == "42</s>"
  np.testing.assert_array_equal(b["positions"][0, :n], np.arange(n))
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * n + [0] * (16 - n))
  np.testing.assert_array_equal(b["seq_index"][0], [0] * n + [-1] * (16 - n))


def test_loss_on_all_and_text_train_every_token_but_the_first(make_cfg, write_jsonl):
  path = write_jsonl([{"prompt": "ab", "completion": "c"}])
  tok, b = _first_batch(make_cfg(train=path, max_len=8, loss_on="all"))
  assert tok.decode(_trained_targets(b), skip_special_tokens=False) == "abc</s>"
  path = write_jsonl([{"text": "hello"}], name="text.jsonl")
  tok, b = _first_batch(make_cfg(train=path, max_len=8))
  assert tok.decode(_trained_targets(b), skip_special_tokens=False) == "hello</s>"


def test_pad_equal_to_eos_keeps_the_real_eos_trained(make_cfg, write_jsonl, make_hf_dir):
  path, hf = make_hf_dir(CHATML, eos="</s>", pad="</s>")
  assert hf.pad_token_id == hf.eos_token_id
  data = write_jsonl([{"prompt": "what is 3+5?", "completion": " the answer is 8"},
                      {"prompt": "hello", "completion": " world"}])
  cfg = make_cfg(train=data, tokenizer=f"hf:{path}", max_len=24, shuffle=False)
  tok, b = _first_batch(cfg, batch_size=2)
  for row, (prompt, completion) in enumerate([("what is 3+5?", " the answer is 8"),
                                              ("hello", " world")]):
    full = hf(prompt + completion)["input_ids"] + [hf.eos_token_id]
    n_prompt = len(hf(prompt)["input_ids"])
    np.testing.assert_array_equal(_trained_targets(b, row), full[n_prompt:])
    assert _trained_targets(b, row)[-1] == hf.eos_token_id
    # Padding is id 0 and never trained, whatever the tokenizer's pad id is.
    pad = b["segment_ids"][row] == 0
    assert pad.any() and not b["tokens"][row][pad].any() and not b["loss_mask"][row][pad].any()


def test_assistant_only_mask_with_the_byte_chat_template(make_cfg, write_jsonl):
  messages = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"},
              {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
  path = write_jsonl([{"messages": messages}])
  tok, b = _first_batch(make_cfg(train=path, max_len=64, loss_on="assistant"))
  text = tok.decode(b["tokens"][0], skip_special_tokens=False).replace("<pad>", "")
  assert text == "<s><|user|>\n1+1=</s><|assistant|>\n2</s><|user|>\n2+2=</s><|assistant|>\n4</s>"
  runs = np.flatnonzero(np.diff(np.r_[0, b["loss_mask"][0], 0]))
  trained = [tok.decode(b["targets"][0][a:e], False) for a, e in zip(runs[0::2], runs[1::2])]
  assert trained == ["2</s>", "4</s>"]
  # loss_on='completion' keeps only the final assistant turn.
  tok, b = _first_batch(make_cfg(train=path, max_len=64, loss_on="completion"))
  assert tok.decode(_trained_targets(b), skip_special_tokens=False) == "4</s>"


def test_byte_tokenizer_round_trip_and_specials():
  tok = ByteTokenizer()
  text = "héllo </s> wörld<s>"
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id and tok.eos_id in ids and max(ids) < tok.vocab_size <= 512
  assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
  assert tok.decode(ids) == "héllo  wörld"
  ids, char_to_token = tok.encode_with_char_map(text)
  assert len(char_to_token) == len(text)
  assert ids[char_to_token[1]] == "é".encode()[0] + ByteTokenizer.OFFSET
  assert ids[char_to_token[text.index("</s>") + 2]] == tok.eos_id
