"""Memory-mapped safetensors reading and streaming writing, numpy only (no torch, no pickle).

`safetensors.safe_open(framework='numpy')` cannot return bfloat16 tensors (numpy has no such
dtype) and copies on every read. The format is simple (an 8-byte little-endian header length, a
JSON header of {name: {dtype, shape, data_offsets}}, then raw little-endian bytes), so this module
maps the file once and hands out zero-copy numpy views, with bfloat16 from `ml_dtypes`. Views
compose lazily with reshape/transpose/slicing: a device shard reads only the bytes it needs.
"""
import json
import os
import struct
import sys

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


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
  """Writes {name: np.ndarray} (any of the dtypes above, bfloat16 included), streaming tensors."""
  header, offset = {}, 0
  for name in sorted(tensors):
    t = tensors[name]
    if t.dtype not in _NAMES:
      raise ValueError(f"cannot write tensor {name!r} of dtype {t.dtype} to safetensors")
    header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  header["__metadata__"] = dict(metadata or {})
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)    # readers expect the data to start 8-byte aligned
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name in sorted(tensors):
      # One tensor is materialised at a time (views of stacked layers are copied here only).
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
  os.replace(tmp, path)    # a crash never leaves a truncated file under the final name
