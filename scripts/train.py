"""Train with a recipe from configs/.

  python scripts/train.py --config=configs/dpo.py [--config.optim.lr=5e-7 ...] [--workdir=DIR]
  python scripts/train.py --config=configs/dpo.py:loss=ipo,model=qwen3_0_6b

A workdir that holds checkpoints resumes automatically; without --workdir a fresh directory
runs/<recipe>-<time> is used. Config keys are locked: a misspelled key fails with a suggestion.
"""
import datetime
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file (configs/*.py[:args]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.WARNING)
  import jax
  from jpost.losses import registry
  from jpost.rl import loop as rl_loop
  from jpost.train import distributed, loop

  distributed.maybe_initialize()
  cfg = _CONFIG.value
  recipe = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = _WORKDIR.value or os.path.join(
      "runs", f"{recipe}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
  print(f"jpost: {recipe} -> {workdir} on {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s)", flush=True)
  online = registry.get_objective(cfg.objective.name).data_kind == "rl"
  (rl_loop if online else loop).run(cfg, workdir)


if __name__ == "__main__":
  app.run(main)
