"""Metrics out of the loop: JSONL and TensorBoard (process 0), a progress line, MFU."""
import json
import math
import os
import sys
import time

import jax
import numpy as np
from etils import epath

from jpost.train import flops

def device_peak_flops(device=None) -> float | None:
  return flops.peak_flops((device or jax.devices()[0]).device_kind)


def device_memory_limit(device) -> int:
  """Bytes the device's allocator may use; on CPU (no allocator stats) the host's memory."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class MetricsWriter:
  """One JSON object per logged step in <workdir>/metrics.jsonl (+ TensorBoard); process 0 only.

  The workdir may be local or an object store (`gs://...`, through `etils.epath`). Object stores
  cannot append, so there the rows are kept in memory and the whole file is rewritten at most
  every `remote_flush_s` seconds, at `flush()` (the loop flushes before each checkpoint) and at
  `close()`; a resumed run first reads back the rows already written. Local files get each row
  appended at once.
  """

  def __init__(self, workdir, *, is_main: bool, tensorboard: bool = True,
               remote_flush_s: float = 60.0):
    self.is_main = is_main
    self.path = epath.Path(workdir) / "metrics.jsonl"
    self._remote = is_remote(self.path)
    self._remote_flush_s = remote_flush_s
    self._lines, self._dirty, self._flushed_at = [], False, time.monotonic()
    if is_main and self._remote and self.path.exists():
      self._lines = self.path.read_text().splitlines(keepends=True)
    self._tb = None
    if is_main and tensorboard:
      from tensorboardX import SummaryWriter  # imported lazily: optional at run time
      self._tb = SummaryWriter(os.fspath(epath.Path(workdir) / "tb"))

  def write(self, step: int, metrics: dict):
    if not self.is_main:
      return
    row = {"step": int(step)}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else str(v)
      if self._tb is not None and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    line = json.dumps(row) + "\n"
    if not self._remote:
      with self.path.open("a") as f:
        f.write(line)
      return
    self._lines.append(line)
    self._dirty = True
    if time.monotonic() - self._flushed_at >= self._remote_flush_s:
      self.flush()

  def flush(self):
    """Makes every row written so far visible in the file (remote: rewrites it)."""
    if self._tb is not None:
      self._tb.flush()
    if self.is_main and self._remote and self._dirty:
      self.path.write_text("".join(self._lines))
      self._dirty, self._flushed_at = False, time.monotonic()

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()


def is_remote(path) -> bool:
  """gs://, s3://, ... (no appends, no atomic rename) rather than a local or mounted path."""
  return "://" in os.fspath(path)


class Progress:
  """One line per logged step: loss, tokens/s (total and per device), MFU, ETA."""

  def __init__(self, total_steps: int, flops_per_token: float | None, n_devices: int,
               stream=sys.stdout):
    self.total = total_steps
    self.flops_per_token = flops_per_token
    self.n_devices = n_devices
    self.peak = device_peak_flops()
    self.stream = stream
    self._t0 = None
    self._tokens = 0

  def start(self, step: int):
    self._t0, self._step0, self._tokens = time.perf_counter(), step, 0

  def line(self, step: int, metrics: dict, tokens: float, key="train/loss") -> dict:
    """Adds perf metrics for the window since the last call and prints the line."""
    self._tokens += tokens
    now = time.perf_counter()
    dt = max(now - self._t0, 1e-9)
    steps = max(step - self._step0, 1)
    tok_s = self._tokens / dt
    perf = {"perf/tokens_per_s": tok_s, "perf/tokens_per_s_per_device": tok_s / self.n_devices,
            "perf/step_time_s": dt / steps}
    mfu = ""
    if self.flops_per_token and self.peak:
      perf["perf/mfu"] = tok_s * self.flops_per_token / (self.peak * self.n_devices)
      mfu = f" mfu {100 * perf['perf/mfu']:.1f}%"
    eta = (self.total - step) * dt / steps
    loss = metrics.get(key, float("nan"))
    print(f"step {step}/{self.total} loss {float(loss):.4f} {tok_s:,.0f} tok/s"
          f" ({tok_s / self.n_devices:,.0f}/dev){mfu} eta {eta:.0f}s", file=self.stream, flush=True)
    self._t0, self._step0, self._tokens = now, step, 0
    return perf
