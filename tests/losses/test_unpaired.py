"""jpost.losses.unpaired (KTO, BCO, implicit PRM) vs NumPy references from ALGORITHMS.md §3."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpost.losses import unpaired as up
from loss_batches import S, build, grad_on, off_token_mask, random_example

RTOL, ATOL = 1e-5, 1e-6
NAMES = ("kto", "bco", "implicit_prm")
LENGTHS = (3, 6, None, 1, 4, 5, 2)            # slot 2 and slot 7 are padding
LABELS = (1, 0, 0, 0, 1, 1, 0, 0)
PACKED = [[0, 1, 3], [4, 5, 6]]


def _examples(seed=0, mm_shift=0.0, scale=0.5):
  """mm_shift > 0 makes the mismatched rows' policy-minus-reference positive on average (z > 0)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in LENGTHS:
    if n is None:
      out.append(None)
      continue
    e = random_example(rng, n, scale=scale)
    m = int(rng.integers(1, 6))
    e["mm_lp"] = -scale * rng.exponential(1.0, m) + mm_shift / m
    e["mm_ref"] = -scale * rng.exponential(1.0, m)
    out.append(e)
  return out


def _build(ex, layout=None, labels=LABELS, state_shift=None, **kw):
  logps, batch, where = build(ex, layout, **kw)
  batch["label"] = np.asarray(labels[:S] + (0,) * (S - len(labels)), np.float32)
  if state_shift is not None:
    batch["objective_state"] = {"shift": jnp.float32(state_shift), "count": jnp.int32(5)}
  return logps, batch, where


def _cfg(name, **kw):
  c = up.default_config(name)
  c.update(kw)
  return c


def _sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def _logsig(x):
  return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------- NumPy references

def _delta(e):
  return np.sum(e["lp"], dtype=np.float64) - np.sum(e["ref"], dtype=np.float64)


def np_z(ex):
  mm = [np.sum(e["mm_lp"], dtype=np.float64) - np.sum(e["mm_ref"], dtype=np.float64)
        for e in ex if e is not None]
  return max(0.0, np.mean(mm))


def _reward_metrics(ex, labels, reward):
  chosen = [reward(e) for e, y in zip(ex, labels) if e is not None and y == 1]
  rejected = [reward(e) for e, y in zip(ex, labels) if e is not None and y == 0]
  return {"rewards/chosen": np.mean(chosen), "rewards/rejected": np.mean(rejected),
          "rewards/margin": np.mean(chosen) - np.mean(rejected)}


def np_kto(ex, labels, cfg, z=None):
  z = np_z(ex) if z is None else z
  losses = []
  for e, y in zip(ex, labels):
    if e is None:
      continue
    d = _delta(e)
    if y == 1:
      losses.append(cfg.lambda_d * (1 - _sig(cfg.beta * (d - z))))
    else:
      losses.append(cfg.lambda_u * (1 - _sig(cfg.beta * (z - d))))
  metrics = _reward_metrics(ex, labels, lambda e: cfg.beta * _delta(e))
  metrics["kto/z"] = z
  return np.mean(losses), metrics


def np_bco(ex, labels, cfg, shift, udm=None):
  losses, rs = [], []
  for i, (e, y) in enumerate(zip(ex, labels)):
    if e is None:
      continue
    r = cfg.beta * _delta(e)
    rs.append(r)
    if y == 1:
      losses.append(-_logsig(r - shift))
    else:
      losses.append(-_logsig(-(r - shift)) * (1.0 if udm is None else udm[i]))
  metrics = _reward_metrics(ex, labels, lambda e: cfg.beta * _delta(e))
  metrics.update({"bco/reward_sum": np.sum(rs), "bco/reward_count": len(rs), "bco/shift": shift})
  return np.mean(losses), metrics


def np_prm(ex, labels, cfg):
  losses, correct = [], []
  for e, y in zip(ex, labels):
    if e is None:
      continue
    z = cfg.beta * _delta(e)
    p = _sig(z)
    losses.append(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    correct.append((z > 0) == (y > 0.5))
  metrics = _reward_metrics(ex, labels, lambda e: cfg.beta * _delta(e))
  metrics["prm_accuracy"] = np.mean(correct)
  return np.mean(losses), metrics


def _reference(name, ex, labels, cfg, shift=0.0):
  if name == "kto":
    return np_kto(ex, labels, cfg)
  if name == "bco":
    return np_bco(ex, labels, cfg, shift)
  return np_prm(ex, labels, cfg)


def _check(loss, metrics, expected_loss, expected_metrics):
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(expected_metrics), (set(metrics), set(expected_metrics))
  for k, v in expected_metrics.items():
    np.testing.assert_allclose(metrics[k], v, rtol=RTOL, atol=ATOL, err_msg=k)


# ------------------------------------------------------------------------------------- all three

def test_defaults():
  assert dict(up.default_config("kto")) == {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0}
  assert dict(up.default_config("bco")) == {"beta": 0.1}
  assert dict(up.default_config("implicit_prm")) == {"beta": 0.05}


@pytest.mark.parametrize("layout", (None, PACKED))
@pytest.mark.parametrize("mm_shift", (0.0, 6.0))
@pytest.mark.parametrize("name", NAMES)
def test_matches_numpy(name, mm_shift, layout):
  ex = _examples(0, mm_shift)
  cfg = _cfg(name)
  logps, batch, _ = _build(ex, layout, state_shift=0.3)
  if name == "kto":
    assert (np_z(ex) > 0) == (mm_shift > 0)         # both branches of max(0, .) are exercised
  loss, metrics = up.LOSSES[name](logps, batch, cfg)
  _check(loss, metrics, *_reference(name, ex, LABELS, cfg, shift=0.3))


def test_kto_weights():
  ex = _examples(1, 3.0)
  cfg = _cfg("kto", lambda_d=1.33, lambda_u=0.5, beta=0.3)
  loss, metrics = up.kto(*_build(ex, PACKED)[:2], cfg)
  _check(loss, metrics, *np_kto(ex, LABELS, cfg))


@pytest.mark.parametrize("name", NAMES)
def test_precomputed_reference_equals_token_reference(name):
  ex = _examples(2, 4.0)
  cfg = _cfg(name)
  la, ma = up.LOSSES[name](*_build(ex, PACKED, state_shift=-0.2)[:2], cfg)
  logps, batch, _ = _build(ex, PACKED, state_shift=-0.2, ref_seq=True)
  assert "ref" not in logps
  if name == "kto":   # the mismatched rows' reference may be precomputed too
    logps["mismatch_ref_seq"] = jnp.asarray(
        [np.sum(e["mm_ref"]) if e is not None else np.nan for e in ex] + [np.nan])
    del logps["mismatch_ref"]
  lb, mb = up.LOSSES[name](logps, batch, cfg)
  _check(lb, mb, la, ma)


@pytest.mark.parametrize("name", NAMES)
def test_jit_equals_no_jit(name):
  logps, batch, _ = _build(_examples(3, 2.0), PACKED, state_shift=0.1)
  cfg = _cfg(name)
  fn = lambda l, b: up.LOSSES[name](l, b, cfg)
  (a, ma), (b, mb) = jax.jit(fn)(logps, batch), fn(logps, batch)
  _check(a, ma, b, mb)


@pytest.mark.parametrize("name", NAMES)
def test_additive_over_micro_batches(name):
  """Halves with the global denominators sum to the full batch. KTO's z is a batch statistic: the
  step supplies the whole batch's z as `kto_z` (else each micro-batch uses its own, as TRL)."""
  ex = _examples(4, 5.0)
  cfg = _cfg(name)
  full_logps, full_batch, _ = _build(ex, PACKED, state_shift=0.25)
  full, full_m = up.LOSSES[name](full_logps, full_batch, cfg)
  n_valid = sum(e is not None for e in ex)
  n_des = sum(e is not None and y for e, y in zip(ex, LABELS))
  denoms = {"denom_examples": np.float32(n_valid), "denom_desirable": np.float32(n_des),
            "denom_undesirable": np.float32(n_valid - n_des)}
  if name == "kto":
    denoms["kto_z"] = up.kto_reference_point(full_logps, full_batch)
    assert float(denoms["kto_z"]) > 0
  total, totals = 0.0, {}
  for lo, hi in ((0, 3), (3, len(ex))):
    logps, batch, _ = _build(ex[lo:hi], labels=LABELS[lo:hi], state_shift=0.25)
    loss, m = up.LOSSES[name](logps, dict(batch, **denoms), cfg)
    total += loss
    totals = {k: totals.get(k, 0.0) + v for k, v in m.items()}
  _check(total, totals, full, full_m)


@pytest.mark.parametrize("name", NAMES)
def test_gradient_signs(name, layout=PACKED):
  """Desirable rows push delta = S_theta - S_ref up (negative gradient on their tokens),
  undesirable rows push it down; prompt, padding and the mismatched rows get no gradient."""
  ex = _examples(5, 3.0)
  logps, batch, where = _build(ex, layout, state_shift=0.4)
  cfg = _cfg(name)
  g = jax.grad(lambda l: up.LOSSES[name](l, batch, cfg)[0])(logps)
  for i, e in enumerate(ex):
    if e is None:
      continue
    gi = grad_on(where, g["policy"], i)
    assert np.all(gi < 0) if LABELS[i] else np.all(gi > 0), (name, i, gi)
  assert np.all(np.asarray(g["policy"])[off_token_mask(where)] == 0)
  if name == "kto":     # z is a stop-gradient reference point
    assert np.all(np.asarray(g["mismatch_policy"]) == 0)


def test_subset_metrics_without_global_label_counts():
  """Without denom_desirable / denom_undesirable, the summed micro-batch metric is the
  example-weighted mean of the micro-batch means (not their sum)."""
  ex = _examples(11)
  cfg = _cfg("implicit_prm")
  halves = ((0, 3), (3, len(ex)))
  n_valid = sum(e is not None for e in ex)
  total, expected = 0.0, 0.0
  for lo, hi in halves:
    logps, batch, _ = _build(ex[lo:hi], labels=LABELS[lo:hi])
    _, m = up.implicit_prm(logps, dict(batch, denom_examples=np.float32(n_valid)), cfg)
    total += m["rewards/chosen"]
    chosen = [cfg.beta * _delta(e) for e, y in zip(ex[lo:hi], LABELS[lo:hi]) if e is not None and y]
    expected += np.mean(chosen) * sum(e is not None for e in ex[lo:hi]) / n_valid
  np.testing.assert_allclose(total, expected, rtol=RTOL)


# -------------------------------------------------------------------------------------------- KTO

def test_kto_is_pushed_by_z():
  """A larger reference point z makes desirable rows' loss larger and undesirable rows' smaller."""
  ex = _examples(6)
  logps, batch, _ = _build(ex, labels=(1,) * 8)
  lo, _ = up.kto(logps, dict(batch, kto_z=jnp.float32(0.0)), _cfg("kto"))
  hi, _ = up.kto(logps, dict(batch, kto_z=jnp.float32(2.0)), _cfg("kto"))
  assert hi > lo
  logps, batch, _ = _build(ex, labels=(0,) * 8)
  lo, _ = up.kto(logps, dict(batch, kto_z=jnp.float32(0.0)), _cfg("kto"))
  hi, _ = up.kto(logps, dict(batch, kto_z=jnp.float32(2.0)), _cfg("kto"))
  assert hi < lo


# -------------------------------------------------------------------------------------------- BCO

def test_bco_distribution_matching_weights():
  ex = _examples(7)
  p = np.array([0.1, 0.5, 0.3, 0.97, 0.02, 0.6, 0.8, 0.5], np.float32)
  w = np.asarray(up.udm_weight_from_prob(jnp.asarray(p)))
  np.testing.assert_allclose(w, np.clip(p / (1 - p + 1e-8), 0.5, 10.0), rtol=1e-6)
  logps, batch, _ = _build(ex, PACKED, state_shift=0.05)
  batch["udm_weight"] = w
  cfg = _cfg("bco")
  loss, metrics = up.bco(logps, batch, cfg)
  _check(loss, metrics, *np_bco(ex, LABELS, cfg, 0.05, udm=w))


def test_bco_running_shift_over_steps():
  """The step contract: the loss reads the state, the step sums its micro-batches' metrics and
  calls bco_update_state. The shift of step k = mean of every r of steps < k (0 at the start)."""
  cfg = _cfg("bco", beta=0.5)
  state = up.bco_init_state()
  seen = []
  for step in range(4):
    micro = [_examples(10 * step + k, scale=0.3 + step) for k in range(2)]
    if step == 2:
      micro[1] = [None] * 7                   # an all-padding micro-batch adds nothing
    expected_shift = np.mean(seen) if seen else 0.0
    totals, loss = {}, 0.0
    n_valid = sum(e is not None for ex in micro for e in ex)
    for ex in micro:
      logps, batch, _ = _build(ex)
      batch = dict(batch, objective_state=state, denom_examples=np.float32(max(n_valid, 1)))
      l, m = up.bco(logps, batch, cfg)
      loss += l
      totals = {k: totals.get(k, 0.0) + v for k, v in m.items()}
    np.testing.assert_allclose(totals["bco/shift"], expected_shift, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        loss, np_bco([e for ex in micro for e in ex], LABELS[:7] * 2, cfg, expected_shift)[0],
        rtol=RTOL)
    state = jax.jit(up.bco_update_state)(state, totals)
    seen += [cfg.beta * _delta(e) for ex in micro for e in ex if e is not None]
    np.testing.assert_allclose(state["shift"], np.mean(seen), rtol=1e-5)
    assert int(state["count"]) == len(seen)


def test_bco_needs_its_state():
  logps, batch, _ = _build(_examples())
  with pytest.raises(KeyError, match="objective_state"):
    up.bco(logps, batch, _cfg("bco"))


def test_bco_state_update_with_nothing_seen_stays_finite():
  nothing = {"bco/reward_sum": jnp.float32(0), "bco/reward_count": jnp.float32(0)}
  state = up.bco_update_state(up.bco_init_state(), nothing)
  assert float(state["shift"]) == 0.0 and int(state["count"]) == 0


# ----------------------------------------------------------------------------------- implicit PRM

def test_implicit_prm_soft_labels():
  ex = _examples(8, scale=3.0)
  labels = (0.9, 0.2, 0.0, 1.0, 0.6, 0.0, 0.35, 0.0)
  logps, batch, _ = build(ex, PACKED)
  batch["label"] = np.asarray(labels, np.float32)
  cfg = _cfg("implicit_prm")
  loss, _ = up.implicit_prm(logps, batch, cfg)
  z = [(cfg.beta * _delta(e), y) for e, y in zip(ex, labels) if e is not None]
  expected = np.mean([-(y * _logsig(zi) + (1 - y) * _logsig(-zi)) for zi, y in z])
  np.testing.assert_allclose(loss, expected, rtol=RTOL)


def _steps_np(targets, rewards, delim):
  """Split one response into steps: a delimiter token ends its step."""
  steps, cur = [], []
  for tok, r in zip(targets, rewards):
    cur.append(r)
    if tok in delim:
      steps.append(sum(cur))
      cur = []
  if cur:
    steps.append(sum(cur))
  return steps


@pytest.mark.parametrize("max_steps", (6, 2))
def test_prm_inference_helpers(max_steps):
  rng = np.random.default_rng(0)
  delim = (13, 7)
  ex = _examples(9)
  logps, batch, where = build(ex, PACKED)
  targets = rng.integers(0, 20, size=batch["loss_mask"].shape).astype(np.int32)
  for i, (b, sl) in where.items():           # guarantee some multi-step responses
    if len(ex[i]["lp"]) >= 4:
      targets[b, sl.start + 1] = 13
      targets[b, sl.start + 2] = 7
  beta = 0.05
  tok_r = up.prm_token_rewards(logps["policy"], logps["ref"], beta, batch["loss_mask"])
  np.testing.assert_allclose(tok_r, beta * (logps["policy"] - logps["ref"]) * batch["loss_mask"],
                             rtol=1e-6)
  # Jitted, as they run at inference (delimiters and sizes are static).
  step_ids = jax.jit(up.step_ids_from_delimiter, static_argnums=(3, 4))(
      targets, batch["loss_mask"], batch["seq_index"], delim, S)
  out = jax.jit(up.prm_step_scores, static_argnames=("num_examples", "max_steps"))(
      tok_r, step_ids, batch["seq_index"], num_examples=S, max_steps=max_steps)
  assert np.all(np.asarray(step_ids)[off_token_mask(where)] == -1)
  for i, e in enumerate(ex + [None]):
    if e is None:
      assert out["num_steps"][i] == 0 and out["min"][i] == 0 and out["sum"][i] == 0
      continue
    b, sl = where[i]
    steps = _steps_np(targets[b, sl], beta * (e["lp"] - e["ref"]), delim)
    assert int(out["num_steps"][i]) == len(steps)
    merged = steps[:max_steps - 1] + [sum(steps[max_steps - 1:])] if len(steps) > max_steps \
        else steps
    k = len(merged)
    np.testing.assert_allclose(out["step_rewards"][i, :k], merged, rtol=1e-5, atol=1e-7)
    assert np.all(out["step_valid"][i, :k] == 1) and np.all(out["step_valid"][i, k:] == 0)
    np.testing.assert_allclose(out["min"][i], min(merged), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["sum"][i], sum(steps), rtol=1e-5, atol=1e-7)
  assert any(int(n) > 2 for n in out["num_steps"])     # the delimiters did split responses
