"""Select the candidate rows closest to a target set with ZIP-FIT (gzip compression alignment).

  python scripts/select_data.py --candidates=pool.jsonl --target=task.jsonl --k=1000 \
      --out=selected.jsonl [--scores=scores.jsonl] [--field=auto] [--workers=4]

Each candidate's alignment is 1 - mean NCD to the target rows, NCD(x, y) = (C(xy) - min(C(x),
C(y))) / max(C(x), C(y)) with C the gzip length (see jpost/edit/zipfit.py); the k most aligned
candidates are written unchanged (their JSONL lines as read), best first. --scores writes one
line per candidate, in input order: {"index": i (0-based row of --candidates), "line": its line
number, "score": alignment, "selected": bool}.

The text of a row (--field=auto): `text`, else `prompt` + `completion` (or `chosen`), else the
`messages` contents joined; --field=text | prompt+completion | messages forces one.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jpost.edit import zipfit  # noqa: E402  (no JAX: cheap)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  p.add_argument("--candidates", required=True, help="JSONL rows to select from")
  p.add_argument("--target", required=True, help="JSONL rows of the target task")
  p.add_argument("--k", type=int, required=True, help="how many candidates to keep")
  p.add_argument("--out", required=True, help="output JSONL: the selected rows, best first")
  p.add_argument("--scores", default=None, help="optional JSONL of every candidate's score")
  p.add_argument("--field", choices=zipfit.FIELDS, default="auto", help="which text to compare")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
  p.add_argument("--level", type=int, default=zipfit.DEFAULT_LEVEL, help="gzip level 1-9")
  args = p.parse_args(argv)
  if args.k < 1:
    p.error("--k must be >= 1")
  if not 1 <= args.level <= 9:
    p.error("--level must be in 1..9")
  return args


def run(args) -> dict:
  cand_rows, cand_texts = zipfit.read_texts(args.candidates, args.field)
  _, target_texts = zipfit.read_texts(args.target, args.field)
  if not cand_rows:
    raise zipfit.RowTextError(f"{args.candidates}: no rows")
  if not target_texts:
    raise zipfit.RowTextError(f"{args.target}: no rows")
  start = time.time()
  scores = zipfit.score_candidates(cand_texts, target_texts, workers=args.workers,
                                   level=args.level)
  keep = zipfit.top_k(scores, args.k)
  with open(args.out, "w", encoding="utf-8") as f:
    for i in keep:
      f.write(cand_rows[i][1] + "\n")
  if args.scores:
    chosen = set(int(i) for i in keep)
    with open(args.scores, "w", encoding="utf-8") as f:
      for i, (line_no, _, _) in enumerate(cand_rows):
        f.write(json.dumps({"index": i, "line": line_no, "score": float(scores[i]),
                            "selected": i in chosen}) + "\n")
  return {"candidates": len(cand_rows), "targets": len(target_texts), "selected": len(keep),
          "seconds": time.time() - start,
          "score_range": (float(scores[keep].min()), float(scores[keep].max()))}


def main(argv=None):
  args = parse_args(argv)
  try:
    info = run(args)
  except (zipfit.RowTextError, FileNotFoundError) as e:
    print(f"select_data.py: error: {e}", file=sys.stderr)
    return 1
  lo, hi = info["score_range"]
  print(f"selected {info['selected']} of {info['candidates']} candidates against "
        f"{info['targets']} target rows (alignment {lo:.4f}..{hi:.4f}, {info['seconds']:.1f}s) "
        f"-> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
