"""Score a JSONL file with a trained reward model or an implicit process reward model.

  # Reward model (a jpost workdir trained with configs/rm.py): adds `score` (pairs: `score_chosen`,
  # `score_rejected`) to every row.
  python scripts/score.py rows.jsonl --model=runs/rm-... --output=scored.jsonl

  # Implicit PRM: per-token reward beta * (log pi - log pi_ref), summed per step; adds
  # `step_scores`, `min`, `sum` (pairs: suffixed `_chosen` / `_rejected`).
  python scripts/score.py rows.jsonl --model=runs/prm-... --ref=hf:/models/sft \
      [--delimiter='\\n\\n'] [--beta=0.05]

Rows: `prompt` + `completion` (or `messages` / `text`) or `prompt` + `chosen` + `rejected`,
encoded as in training (the workdir's config.json: tokenizer, chat template, max_len). --model and
--ref take a jpost workdir (or its checkpoints/ directory) or `hf:DIR`. See jpost/scoring.py for
how steps are split and how tokens that straddle a step boundary are assigned.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("input", help="a JSONL file")
  parser.add_argument("--model", required=True,
                      help="reward model, or the PRM policy with --ref: a jpost workdir or hf:DIR")
  parser.add_argument("--ref", default=None, help="implicit PRM: the reference model")
  parser.add_argument("--output", default="-", help="output JSONL ('-': stdout)")
  parser.add_argument("--tokenizer", default=None,
                      help="byte | hf:DIR (default: the run's data.tokenizer; hf:DIR for an HF "
                      "model)")
  parser.add_argument("--max_len", type=int, default=None,
                      help="tokens per sequence (default: the run's data.max_len); longer rows "
                      "lose the oldest prompt tokens")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--delimiter", default=None,
                      help="PRM step delimiter, backslash escapes allowed (default '\\n\\n')")
  parser.add_argument("--beta", type=float, default=None,
                      help="PRM beta (default: the run's objective.beta for implicit_prm, "
                      "else 0.05)")
  parser.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
  args = parser.parse_args()

  from jpost import data as jdata
  from jpost import scoring

  try:
    rows = _score(args, jdata, scoring)
  except (jdata.DataError, ValueError, FileNotFoundError) as e:
    raise SystemExit(f"score.py: {e}") from None
  out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
  try:
    for row in rows:
      out.write(json.dumps(row, ensure_ascii=False) + "\n")
  finally:
    if out is not sys.stdout:
      out.close()
  if args.output != "-":
    print(f"scored {len(rows)} rows -> {args.output}", file=sys.stderr)


def _score(args, jdata, scoring):
  """-> the rows with their scores added."""
  model = scoring.load_model(args.model, args.dtype)
  ref = scoring.load_model(args.ref, args.dtype) if args.ref else None
  data_cfg = scoring.data_config([m for m in (model, ref) if m], args.tokenizer, args.max_len)
  tokenizer = jdata.make_tokenizer(data_cfg)
  for m in filter(None, (model, ref)):
    if tokenizer.vocab_size > m.cfg.vocab_size:
      raise ValueError(f"tokenizer {data_cfg.tokenizer!r} has {tokenizer.vocab_size} tokens but "
                       f"{m.source} has vocab_size {m.cfg.vocab_size}: pass the model's "
                       "--tokenizer")
  items = scoring.encode_file(args.input, tokenizer, data_cfg)
  if ref is None:
    rows = scoring.score_rm(items, model, batch_size=args.batch_size)
  else:
    delimiter = scoring.DEFAULT_DELIMITER if args.delimiter is None \
        else scoring.parse_delimiter(args.delimiter)
    rows = scoring.score_prm(items, model, ref, tokenizer, beta=scoring.prm_beta(model, args.beta),
                             delimiter=delimiter, batch_size=args.batch_size)
  return rows


if __name__ == "__main__":
  main()
