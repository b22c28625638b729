"""The objective registry: every objective of ALGORITHMS.md §1-§3, its requirements, its config."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jpost.losses import registry
from loss_batches import build, random_example

OFFLINE = ("nll", "dft", "asft", "sft_kl", "sigmoid", "dpo_norm", "ipo", "hinge", "robust",
           "bco_pair", "simpo", "orpo", "rm_bt", "kto", "bco", "implicit_prm")


def test_every_offline_objective_is_registered():
  assert set(OFFLINE) <= set(registry.OBJECTIVES)


def test_requirements():
  get = registry.get_objective
  assert {n for n in OFFLINE if get(n).needs_ref} == {
      "sigmoid", "dpo_norm", "ipo", "hinge", "robust", "bco_pair", "kto", "bco", "implicit_prm"}
  assert {n for n in OFFLINE if get(n).needs_kl} == {"asft", "sft_kl"}
  assert {n for n in OFFLINE if get(n).needs_mismatch} == {"kto"}
  assert {n for n in OFFLINE if get(n).stateful} == {"bco"}
  assert {n for n in OFFLINE if get(n).head == "reward"} == {"rm_bt"}
  assert not any(get(n).needs_entropy for n in OFFLINE)
  for n in OFFLINE:
    o = get(n)
    assert o.data_kind == ("sft" if n in ("nll", "dft", "asft", "sft_kl") else
                           "unpaired" if n in ("kto", "bco", "implicit_prm") else "pairwise")
    assert o.denom_unit == ("pairs" if o.data_kind == "pairwise" else "examples")
    assert isinstance(o.default_config(), ml_collections.ConfigDict)
    assert (o.init_objective_state() != {}) == o.stateful


def test_default_configs_follow_the_spec():
  cfg = lambda n: registry.get_objective(n).default_config()
  assert cfg("nll").reduction == "token_mean"
  assert cfg("asft").kl_coef == 0.05
  assert cfg("sigmoid").beta == 0.1 and cfg("sigmoid").label_smoothing == 0.0
  assert cfg("simpo").beta == 2.0 and cfg("simpo").gamma == 0.5
  assert cfg("orpo").lam == 0.1
  assert cfg("rm_bt").center_coef == 0.0
  assert cfg("kto").beta == 0.1 and cfg("kto").lambda_d == 1.0 and cfg("kto").lambda_u == 1.0
  assert cfg("bco").beta == 0.1
  assert cfg("implicit_prm").beta == 0.05
  # A fresh config each call: a recipe editing its copy cannot change the defaults.
  c = cfg("sigmoid")
  c.beta = 3.0
  assert cfg("sigmoid").beta == 0.1


@pytest.mark.parametrize("typo,suggestion", [("sigmiod", "sigmoid"), ("kt0", "kto"),
                                             ("implicit_rpm", "implicit_prm"), ("dpo", "sigmoid")])
def test_unknown_name_suggests(typo, suggestion):
  with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
    registry.get_objective(typo)


def test_unknown_name_without_close_match_lists_the_objectives():
  with pytest.raises(ValueError, match="registered: .*nll"):
    registry.get_objective("zzzzzzzz")


def _inputs(objective):
  """logps holding exactly what the registry entry declares, and a batch of its data kind."""
  rng = np.random.default_rng(0)
  ex = [random_example(rng, n, with_kl=True) for n in (3, 2, 4, 1)]
  for e in ex:
    e["mm_lp"], e["mm_ref"] = -rng.exponential(1.0, 2), -rng.exponential(1.0, 2)
  full, batch, _ = build(ex)
  logps = {"policy": full["policy"]} if objective.head == "lm" else {}
  if objective.needs_ref:
    logps["ref"] = full["ref"]
  if objective.needs_kl:
    logps["kl"] = full["kl"]
  if objective.needs_mismatch:
    logps["mismatch_policy"], logps["mismatch_ref"] = full["mismatch_policy"], full["mismatch_ref"]
  if objective.head == "reward":
    logps["reward"] = jnp.arange(8.0) / 4
  if objective.data_kind == "unpaired":
    batch["label"] = np.array([1, 0, 0, 1, 0, 0, 0, 0], np.float32)
  if objective.stateful:
    batch["objective_state"] = objective.init_objective_state()
  return logps, batch


@pytest.mark.parametrize("name", OFFLINE)
def test_declared_requirements_suffice(name):
  """The fn runs on exactly the logps its needs_* flags ask the step for, and the stateful
  wiring (state in, summed metrics -> update) works under jit."""
  objective = registry.get_objective(name)
  logps, batch = _inputs(objective)
  loss, metrics = objective.fn(logps, batch, objective.default_config())
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(v)) for v in metrics.values())
  if objective.stateful:
    new = jax.jit(objective.update_objective_state)(batch["objective_state"], metrics)
    assert jax.tree.structure(new) == jax.tree.structure(objective.init_objective_state())
