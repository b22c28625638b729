"""metrics.jsonl -> one PNG with a panel per metric group (train/eval curves)."""
import io
import json
import os

import matplotlib
from etils import epath

matplotlib.use("Agg")  # headless: runs on TPU VMs and CI without a display
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_KEYS = ("train/loss", "eval/loss", "eval/accuracy", "rewards/accuracy",
                "eval/rewards/accuracy", "rewards/margin", "eval/rewards/margin",
                "eval/rm_accuracy", "eval/rm_margin", "eval/prm_accuracy", "train/grad_norm",
                "perf/tokens_per_s")


def read_metrics(path):
  series = {}
  with epath.Path(path).open() as f:   # local or gs:// alike
    for line in f:
      row = json.loads(line)
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):
          series.setdefault(k, ([], []))
          series[k][0].append(row["step"])
          series[k][1].append(v)
  return series


def plot_metrics(path, out=None, keys=DEFAULT_KEYS):
  """Draws the chosen metrics (those present) to `out` (default: beside the JSONL)."""
  series = read_metrics(path)
  keys = [k for k in keys if k in series] or sorted(series)[:8]
  out = out or os.fspath(epath.Path(path).parent / "metrics.png")
  cols = min(3, len(keys)) or 1
  rows = -(-len(keys) // cols) or 1
  fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
  for ax, key in zip(axes.flat, keys):
    steps, values = series[key]
    ax.plot(steps, values, marker="." if len(steps) < 30 else None)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  fig.tight_layout()
  png = io.BytesIO()   # matplotlib writes local files only; epath also writes gs://
  fig.savefig(png, format="png", dpi=100)
  plt.close(fig)
  epath.Path(out).write_bytes(png.getvalue())
  return out
