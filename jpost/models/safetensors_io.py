"""Memory-mapped safetensors reading and streaming writing, numpy only (no torch, no pickle).

`safetensors.safe_open(framework='numpy')` cannot return bfloat16 tensors (numpy has no such
dtype) and copies on every read. The format is simple (an 8-byte little-endian header length, a
JSON header of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes), so this module
maps the file once and hands out zero-copy numpy views, with bfloat16 from `ml_dtypes`. Views
compose lazily with reshape/transpose/slicing: a device shard reads only the bytes it needs.
Reading is local (memory maps); writing also accepts object-store URIs (gs://... through
`etils.epath`), tensor by tensor (`write_streamed`).
"""
import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# The format is little-endian; numpy views below use native order.
assert sys.byteorder == "little", "safetensors_io supports little-endian hosts only"


class SafetensorsFile:
  """Read-only, memory-mapped view of one .safetensors file."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.metadata = header.pop("__metadata__", None) or {}
    self._entries = header
    # mmap of an empty region fails; a file with no tensors has nothing to map.
    size = os.path.getsize(path) - 8 - n
    self._buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0 else None

  def keys(self):
    return self._entries.keys()

  def __contains__(self, name):
    return name in self._entries

  def get(self, name: str) -> np.ndarray:
    """A lazy (memory-mapped) array; nothing is read until it is sliced or copied."""
    entry = self._entries[name]
    if entry["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    dtype = _DTYPES[entry["dtype"]]
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    if end == start:
      return np.zeros(shape, dtype)
    return self._buf[start:end].view(dtype).reshape(shape)


def _header(specs: dict, metadata: dict | None) -> bytes:
  """The 8-byte length + JSON header for {name: (dtype, shape)}, data in sorted name order."""
  header, offset = {}, 0
  for name in sorted(specs):
    dtype, shape = np.dtype(specs[name][0]), tuple(int(d) for d in specs[name][1])
    if dtype not in _NAMES:
      raise ValueError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = dict(metadata or {})
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)    # readers expect the data to start 8-byte aligned
  return struct.pack("<Q", len(raw)) + raw


def is_remote(path) -> bool:
  """gs://, s3://, ... (objects: no rename, no append) rather than a local or mounted path."""
  return "://" in os.fspath(path)


@contextlib.contextmanager
def output_file(path):
  """A binary file object whose content appears under `path` only once it is complete.

  Local paths: written to `path.tmp`, then renamed (a crash never leaves a truncated file under
  the final name). Object stores (any `etils.epath` URI, e.g. gs://): written to a local temporary
  file, then copied up in chunks when the block exits without an error (a failed write uploads
  nothing), so the host holds a copy buffer, never the file, in memory.
  """
  if not is_remote(path):
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
      yield f
    os.replace(tmp, path)
    return
  from etils import epath   # only for object stores
  with tempfile.TemporaryDirectory(prefix="jpost_upload_") as local_dir:
    local = os.path.join(local_dir, "object")
    with open(local, "wb") as f:
      yield f
    with open(local, "rb") as src, epath.Path(path).open("wb") as dst:
      shutil.copyfileobj(src, dst, 16 * 2**20)


def write_streamed(path, specs: dict, fetch, metadata: dict | None = None) -> None:
  """Writes a safetensors file whose tensors arrive one at a time.

  `specs` = {name: (dtype, shape)} fixes the header up front; `fetch(name)` is called once per
  name, in sorted name order (the file's data order), and each array is written and dropped
  before the next is fetched, so the host holds one tensor (plus its layout copy) at a time.
  `path` may be local or any `etils.epath` URI (see `output_file`).
  """
  with output_file(path) as f:
    f.write(_header(specs, metadata))
    for name in sorted(specs):
      t = np.ascontiguousarray(fetch(name))
      dtype, shape = np.dtype(specs[name][0]), tuple(specs[name][1])
      if t.dtype != dtype or t.shape != shape:
        raise ValueError(f"{path}: tensor {name!r} arrived as {t.dtype}{list(t.shape)}, "
                         f"the header says {dtype}{list(shape)}")
      f.write(t.reshape(-1).view(np.uint8))   # the array's own buffer, no bytes copy
      del t


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
  """Writes {name: np.ndarray} (any of the dtypes above, bfloat16 included), streaming tensors:
  one is materialised at a time (views of stacked layers are copied here only)."""
  write_streamed(path, {n: (t.dtype, t.shape) for n, t in tensors.items()}, tensors.__getitem__,
                 metadata)
