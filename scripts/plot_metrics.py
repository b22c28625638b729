"""Render a run's metrics.jsonl to PNG curves.

  python scripts/plot_metrics.py runs/dpo-.../metrics.jsonl [--out curves.png] [--keys a,b]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpost.train import plot  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("metrics", help="metrics.jsonl (or the workdir holding it)")
  parser.add_argument("--out", default=None)
  parser.add_argument("--keys", default=None, help="comma-separated metric names")
  args = parser.parse_args()
  path = args.metrics
  if os.path.isdir(path):
    path = os.path.join(path, "metrics.jsonl")
  keys = args.keys.split(",") if args.keys else plot.DEFAULT_KEYS
  print(plot.plot_metrics(path, args.out, keys))


if __name__ == "__main__":
  main()
