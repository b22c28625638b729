"""jpost.data: sources, schemas + validation, tokenizers + chat templates, packing, batches.

  tok = make_tokenizer(cfg.data)
  it = make_train_iterator(cfg.data, "sft", tok, batch_size=32, seed=0,
                           process_index=jax.process_index(), process_count=jax.process_count())
  batch = next(it); state = it.get_state(); ...; it.set_state(state)
  eval_batches = make_eval_batches(cfg.data, "sft", tok, batch_size=32)

Kinds: 'sft' | 'pairwise' | 'unpaired' | 'rl'. Batch keys per kind: docs/architecture.md, "Batches".
"""
from jpost.data import config
from jpost.data.dataset import EncodedDataset, prepare, summary_line
from jpost.data.encode import Encoder, Seq
from jpost.data.pipeline import (DataIterator, make_eval_batches, make_eval_iterator,
                                 make_train_iterator)
from jpost.data.schema import DataError, RowError
from jpost.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

__all__ = [
    "config", "make_tokenizer", "make_train_iterator", "make_eval_iterator", "make_eval_batches",
    "prepare", "summary_line", "EncodedDataset", "Encoder", "Seq", "DataIterator", "DataError",
    "RowError", "ByteTokenizer", "HFTokenizer",
]
