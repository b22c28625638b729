"""Objectives by name: the loss function plus what the train step must prepare for it.

The train step reads an `Objective` to decide which forward passes to run (`needs_*`, `head`),
which data to load (`data_kind`), which global denominator to write into the batch
(`denom_unit`) and whether to carry objective state between steps (`init_objective_state`,
`update_objective_state`; see docs/architecture.md, "Losses").
"""
import dataclasses
import difflib
import functools
from typing import Any, Callable

from jpost.losses import policy_gradient, preference, sft, unpaired


def _no_state():
  return {}


@dataclasses.dataclass(frozen=True)
class Objective:
  fn: Callable                    # (logps, batch, cfg) -> (loss, metrics)
  default_config: Callable        # () -> ml_collections.ConfigDict with ALGORITHMS.md's defaults
  data_kind: str                  # 'sft' | 'pairwise' | 'unpaired' | 'rl' (jpost.data batch kind)
  denom_unit: str = "examples"    # what denom_examples counts: 'examples' | 'pairs'
  head: str = "lm"                # 'lm' (token log-probs) | 'reward' (scalar head: logps['reward'])
  needs_ref: bool = False         # logps['ref'] [B, T] (or precomputed logps['ref_seq'] [S])
  needs_entropy: bool = False     # logps['entropy'] [B, T]
  needs_kl: bool = False          # logps['kl'] [B, T], full-vocabulary KL(ref || policy)
  needs_mismatch: bool = False    # logps['mismatch_policy'], ['mismatch_ref'] on the mismatch_ rows
  needs_values: bool = False      # logps['values'] [B, T] (a value head; PPO)
  # Objective state carried in TrainState.objective_state (e.g. BCO's running reward mean).
  # The step passes it to the loss as batch['objective_state'] and, after the step, calls
  # update_objective_state(state, metrics summed over micro-batches). None: stateless.
  init_objective_state: Callable[[], Any] = _no_state
  update_objective_state: Callable | None = None

  @property
  def stateful(self) -> bool:
    return self.update_objective_state is not None


def _sft(name, **kw):
  return Objective(fn=sft.LOSSES[name], default_config=functools.partial(sft.default_config, name),
                   data_kind="sft", **kw)


def _pairwise(name, **kw):
  return Objective(fn=preference.LOSSES[name],
                   default_config=functools.partial(preference.default_config, name),
                   data_kind="pairwise", denom_unit="pairs", **kw)


def _unpaired(name, **kw):
  return Objective(fn=unpaired.LOSSES[name],
                   default_config=functools.partial(unpaired.default_config, name),
                   data_kind="unpaired", **kw)


OBJECTIVES: dict[str, Objective] = {
    # ALGORITHMS.md §1: supervised fine-tuning.
    "nll": _sft("nll"),
    "dft": _sft("dft"),
    "asft": _sft("asft", needs_kl=True),
    "sft_kl": _sft("sft_kl", needs_kl=True),
    # §2: pairwise preference.
    "sigmoid": _pairwise("sigmoid", needs_ref=True),
    "dpo_norm": _pairwise("dpo_norm", needs_ref=True),
    "ipo": _pairwise("ipo", needs_ref=True),
    "hinge": _pairwise("hinge", needs_ref=True),
    "robust": _pairwise("robust", needs_ref=True),
    "bco_pair": _pairwise("bco_pair", needs_ref=True),
    "simpo": _pairwise("simpo"),
    "orpo": _pairwise("orpo"),
    "rm_bt": _pairwise("rm_bt", head="reward"),
    # §3: unpaired feedback.
    "kto": _unpaired("kto", needs_ref=True, needs_mismatch=True),
    "bco": _unpaired("bco", needs_ref=True, init_objective_state=unpaired.bco_init_state,
                     update_objective_state=unpaired.bco_update_state),
    "implicit_prm": _unpaired("implicit_prm", needs_ref=True),
}

# §4-§5: the unified policy-gradient estimator, one entry per preset (plus its bare defaults).
# The flags are those of the preset's defaults; the online loop recomputes them from the run's
# config with `policy_gradient.requirements`, since an override (e.g. kl_beta) can change them.
def _policy_gradient(preset):
  make = (policy_gradient.default_config if preset is None
          else functools.partial(policy_gradient.preset_config, preset))
  return Objective(fn=policy_gradient.loss, default_config=make, data_kind="rl",
                   **policy_gradient.requirements(make()))


OBJECTIVES["policy_gradient"] = _policy_gradient(None)
for _preset in policy_gradient.PRESETS:
  OBJECTIVES[_preset] = _policy_gradient(_preset)


# Names users bring from papers / TRL for objectives registered under another name: used only for
# the did-you-mean hint (no silent aliasing: the config and metrics keep one name per objective).
_KNOWN_AS = {"dpo": "sigmoid", "sft": "nll", "rdpo": "robust", "slic": "hinge", "rm": "rm_bt",
             "reward": "rm_bt", "prm": "implicit_prm",
             "dr.grpo": "dr_grpo", "drgrpo": "dr_grpo", "pg": "policy_gradient"}


def get_objective(name: str) -> Objective:
  """The registered objective `name`; an unknown name fails with the closest registered names."""
  if name in OBJECTIVES:
    return OBJECTIVES[name]
  close = difflib.get_close_matches(name, OBJECTIVES, n=3)
  if name.lower() in _KNOWN_AS:
    close = [_KNOWN_AS[name.lower()]] + [c for c in close if c != _KNOWN_AS[name.lower()]]
  hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
  raise ValueError(f"unknown objective {name!r}{hint} "
                   f"(registered: {', '.join(sorted(OBJECTIVES))})")
