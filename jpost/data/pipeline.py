"""The grain pipelines: shuffled, repeated, per-process, checkpointable batch iterators.

Unpacked (and every eval set): the example ids form a grain `MapDataset` (`EpochOrder`: a fresh
seeded permutation each epoch, repeated) cut into *global* batches of `batch_size` ids;
process p builds only slots [p*b, (p+1)*b) of each (b = batch_size / process_count), so the
processes' rows are disjoint, cover the global batch, and the iterator state (the next global batch
index) does not depend on the process count. A final partial batch is padded with
`example_valid = 0` slots (or dropped with `data.drop_remainder`).

Packed (sft, pairwise): the same shuffled, repeated stream is dealt round-robin to the processes
(p, p + P, ...), and each packs its share first-fit into `rows` x `max_len` with at most S
example slots (`PackIterDataset`). Its state is the stream position of the first example not yet in
an emitted batch, so a restore replays exactly; the state is JSON (grain's `get_state`).
"""
import copy

import grain
import numpy as np

from jpost.data import batching
from jpost.data import config as data_config
from jpost.data.dataset import EncodedDataset, prepare
from jpost.data.tokenizer import make_tokenizer

_FOREVER = 2**40


class EpochOrder(grain.MapDataset):
  """Index i of the repeated stream -> example id: a fresh seeded permutation per epoch.

  Replaces grain's `shuffle().repeat()`, whose per-index `index_shuffle` costs 0.4 ms at 160
  examples and 7 ms at 10 (cycle walking on small domains). A numpy permutation of the epoch is
  computed once (4 bytes per example) and is a pure function of (seed, epoch), so any index can be
  recomputed after a restore, on any process.
  """

  def __init__(self, num_examples: int, epochs: int, *, seed: int, shuffle: bool):
    super().__init__()
    self._n, self._epochs, self._seed, self._shuffle = num_examples, epochs, seed, shuffle
    self._cached = (-1, None)   # (epoch, permutation); a benign race between prefetch threads

  def __len__(self) -> int:
    return self._n * self._epochs

  def _order(self, epoch):
    cached_epoch, perm = self._cached
    if cached_epoch != epoch:
      rng = np.random.Generator(np.random.PCG64([self._seed % 2**64, epoch]))
      perm = rng.permutation(self._n).astype(np.int32 if self._n < 2**31 else np.int64)
      self._cached = (epoch, perm)
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, i = divmod(int(index), self._n)
    return int(self._order(epoch)[i]) if self._shuffle else i

  def __str__(self) -> str:
    return f"EpochOrder(n={self._n}, epochs={self._epochs}, shuffle={self._shuffle})"


class _Lookup:
  """Example id -> (id, its sequences) (module level, so grain can pickle it into workers)."""

  def __init__(self, store: EncodedDataset):
    self.store = store

  def __call__(self, i):
    return int(i), self.store.example(int(i))


class _LocalBatch:
  """A global batch of example ids -> this process's slice of it, as a batch dict."""

  def __init__(self, store, *, local: int, process_index: int, max_len: int, bos_id,
               prompt_len: int = 0, rl_padding: str = "left"):
    self.store, self.local, self.p = store, local, process_index
    self.max_len, self.bos_id = max_len, bos_id
    self.prompt_len, self.rl_padding = prompt_len, rl_padding

  def __call__(self, global_ids):
    ids = [int(i) for i in global_ids[self.p * self.local:(self.p + 1) * self.local]]
    ids += [None] * (self.local - len(ids))
    examples = [None if i is None else self.store.example(i) for i in ids]
    kind = self.store.kind
    if kind == "rl":
      rows = [None if i is None else self.store.rows[i] for i in ids]
      return batching.rl_batch(examples, rows, self.prompt_len, self.rl_padding)
    if kind == "unpaired":
      labels = [None if i is None else bool(self.store.labels[i]) for i in ids]
      return batching.unpaired_batch(examples, labels, self.max_len, self.bos_id, ids)
    return batching.unpacked_batch(examples, self.max_len, self.store.per, ids)


class PackIterDataset(grain.IterDataset):
  """First-fit packing of whole examples (pairs stay together) into static batches."""

  def __init__(self, parent, *, rows: int, max_len: int, slots: int, drop_remainder: bool):
    super().__init__(parent)
    self.rows, self.max_len, self.slots = rows, max_len, slots
    self.drop_remainder = drop_remainder

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), self)


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, spec: PackIterDataset):
    super().__init__(parent)
    self._spec = spec
    self._pending = None         # the example that did not fit the last emitted batch
    self._pending_state = None   # the parent's state just before that example was read

  def __next__(self):
    s = self._spec
    packer = batching.FirstFitPacker(s.rows, s.max_len, s.slots)
    if self._pending is not None:
      # Sequences are at most max_len and there are >= `per` rows and slots, so an example always
      # fits an empty batch; failing here would silently lose it.
      if not packer.add(self._pending[1], example_id=self._pending[0]):
        raise RuntimeError("an example does not fit an empty packed batch")
      self._pending = None
    while True:
      state = self._parent.get_state()
      try:
        example = next(self._parent)
      except StopIteration:
        if packer.empty or s.drop_remainder:
          raise
        return packer.batch()
      if not packer.add(example[1], example_id=example[0]):
        self._pending, self._pending_state = example, copy.deepcopy(state)
        return packer.batch()

  def get_state(self):
    if self._pending is not None:
      return copy.deepcopy(self._pending_state)
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)
    self._pending = None


class DataIterator:
  """Batches forever (or for `num_epochs`); `get_state()` / `set_state()` are JSON dicts.

  The state records what the order depends on (dataset size, batch size, seed, packing), and
  `set_state` refuses a state written under different settings instead of silently replaying a
  different order. A checkpoint holds every process's state (`set_state_from_processes`).
  """

  def __init__(self, it, identity: dict, summary: dict, store: EncodedDataset | None = None, *,
               process_index: int = 0, process_count: int = 1):
    self._it = it
    self._identity = identity
    self.summary = summary
    self.store = store   # the encoded dataset; batches' `example_id` index into it
    self.process_index, self.process_count = process_index, process_count

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._it)

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), **self._identity}

  def set_state(self, state: dict) -> None:
    diff = {k: (state.get(k), v) for k, v in self._identity.items() if state.get(k) != v}
    if "process_count" in diff:
      saved, now = diff["process_count"]
      raise ValueError(
          f"cannot restore the packed data iterator: it was saved by {saved} process(es) and this "
          f"run has {now}. Packed batches are dealt to the processes round-robin and packed per "
          f"process, so the order depends on the process count: resume with {saved} process(es), "
          f"or start a new workdir from these weights with model.init=ckpt:<old workdir>")
    if diff:
      raise ValueError("cannot restore the data iterator: it was saved with different settings "
                       + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items()))
    self._it.set_state(copy.deepcopy(state["grain"]))

  def set_state_from_processes(self, states: list[dict]) -> None:
    """Restores from the states of all processes of the run that saved (process order).

    With the same process count each process takes its own. Unpacked streams do not depend on the
    process count (every process holds the next global batch index, the same number), so another
    count resumes the same global order exactly; packed streams are per process and refuse.
    """
    if len(states) == self.process_count:
      return self.set_state(states[self.process_index])
    if "process_count" not in states[0] and any(s != states[0] for s in states[1:]):
      raise ValueError(f"the {len(states)} saved data iterator states differ, but this stream is "
                       f"the same on every process: the checkpoint is inconsistent")
    self.set_state(states[0])   # a packed state carries its process count: refused with the remedy


def _check(data_cfg, kind, batch_size, process_count, pack):
  data_config.check(data_cfg)
  data_config.check_kind(kind)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} must be positive and divisible by the "
                     f"{process_count} processes")
  if pack and kind not in ("sft", "pairwise"):
    raise ValueError(f"data.pack is supported for sft and pairwise data, not {kind!r}")


def _build(store, data_cfg, tokenizer, *, batch_size, seed, process_index, process_count,
           shuffle, num_epochs, drop_remainder, pack, threads):
  read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)
  # "Forever" is 2**40 examples rather than an infinite length: grain sizes an infinite dataset
  # as sys.maxsize, and its batch length then overflows for batch_size 1.
  epochs = num_epochs or max(1, _FOREVER // len(store))
  ds = EpochOrder(len(store), epochs, seed=seed, shuffle=shuffle)
  local = batch_size // process_count
  if pack:
    slots = (data_cfg.max_examples_per_batch or 4 * batch_size) // process_count
    if slots < 1:
      raise ValueError(f"data.max_examples_per_batch={data_cfg.max_examples_per_batch} leaves no "
                       f"example slot for each of {process_count} processes")
    ds = ds[process_index::process_count].map(_Lookup(store)).to_iter_dataset(read)
    return PackIterDataset(ds, rows=local * store.per, max_len=data_cfg.max_len,
                           slots=slots * store.per, drop_remainder=drop_remainder).__iter__()
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  ds = ds.map(_LocalBatch(store, local=local, process_index=process_index,
                          max_len=data_cfg.max_len, bos_id=tokenizer.bos_id,
                          prompt_len=data_cfg.max_prompt_len or data_cfg.max_len,
                          rl_padding=data_cfg.rl_padding))
  return ds.to_iter_dataset(read).__iter__()


def make_train_iterator(data_cfg, kind: str, tokenizer=None, *, batch_size: int, seed: int = 0,
                        process_index: int = 0, process_count: int = 1) -> DataIterator:
  """Training batches of `batch_size` examples (pairs for pairwise) summed over all processes.

  Each process gets batch_size / process_count of them per batch; see docs/architecture.md
  ("Batches") for the keys and shapes per kind.
  """
  _check(data_cfg, kind, batch_size, process_count, data_cfg.pack)
  tokenizer = tokenizer or make_tokenizer(data_cfg)
  store = prepare(data_cfg, data_cfg.train, kind, tokenizer, verbose=process_index == 0)
  it = _build(store, data_cfg, tokenizer, batch_size=batch_size, seed=seed,
              process_index=process_index, process_count=process_count,
              shuffle=data_cfg.shuffle, num_epochs=data_cfg.num_epochs,
              drop_remainder=data_cfg.drop_remainder, pack=data_cfg.pack, threads=1)
  identity = {"examples": len(store), "batch_size": batch_size, "seed": seed,
              "shuffle": bool(data_cfg.shuffle), "pack": bool(data_cfg.pack)}
  if data_cfg.pack:   # packed streams are dealt per process: the count fixes the order
    identity["process_count"] = process_count
  return DataIterator(it, identity, store.summary, store, process_index=process_index,
                      process_count=process_count)


def make_eval_iterator(data_cfg, kind: str, tokenizer=None, *, batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> DataIterator | None:
  """One unshuffled pass over `data.eval`, never packed (every process gets the same number of
  batches, the last padded); None when `data.eval` is empty."""
  if not data_cfg.eval:
    return None
  _check(data_cfg, kind, batch_size, process_count, False)
  tokenizer = tokenizer or make_tokenizer(data_cfg)
  store = prepare(data_cfg, data_cfg.eval, kind, tokenizer, verbose=process_index == 0)
  it = _build(store, data_cfg, tokenizer, batch_size=batch_size, seed=0,
              process_index=process_index, process_count=process_count, shuffle=False,
              num_epochs=1, drop_remainder=False, pack=False, threads=0)
  return DataIterator(it, {"examples": len(store), "batch_size": batch_size}, store.summary, store)


def make_eval_batches(data_cfg, kind: str, tokenizer=None, *, batch_size: int,
                      process_index: int = 0, process_count: int = 1) -> list[dict]:
  it = make_eval_iterator(data_cfg, kind, tokenizer, batch_size=batch_size,
                          process_index=process_index, process_count=process_count)
  return [] if it is None else list(it)
