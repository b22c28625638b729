"""Optimiser and learning-rate schedule from the `optim` config section."""
import jax
import ml_collections
import optax

SCHEDULES = ("constant", "linear", "cosine")


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      lr=1e-5,
      schedule="cosine",        # constant | linear | cosine (all after a linear warm-up)
      warmup_steps=0,
      min_lr_ratio=0.0,         # final lr = lr * min_lr_ratio for linear / cosine
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      clip_norm=1.0,            # global-norm clipping; 0 disables it
  ))


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={cfg.schedule!r}: expected one of {SCHEDULES}")
  warmup = int(cfg.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)
  end = cfg.lr * cfg.min_lr_ratio
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(cfg.lr, end, decay_steps)
  else:
    main = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def decay_mask(logical_axes):
  """True for matrices. Norm scales and biases get no weight decay (the usual AdamW practice).

  Decided from logical axis names, not ndim: under `nn.scan` a norm scale is stacked to
  [layers, embed] and would look like a matrix.
  """
  def is_matrix(axes):
    return sum(1 for a in axes if a != "layers") >= 2
  return jax.tree.map(is_matrix, logical_axes, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(cfg, total_steps: int, mask=None) -> optax.GradientTransformation:
  """AdamW with warm-up + schedule and global-norm clipping; `mask` selects decayed params."""
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=mask))
  return keep_state_dtypes(optax.chain(*parts))


def keep_state_dtypes(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` whose state keeps the dtypes it was initialised with.

  optax initialises Adam's moments in the params' dtype, but updating them with float32
  gradients promotes them to float32: with bfloat16 params the state would change dtype after
  the first step (a second compile of the train step, twice the moment memory the config asked
  for, and a checkpoint whose dtypes differ from a fresh state's). Casting back after each update
  keeps the moments in the params' dtype; a no-op for float32 params.
  """
  def update(updates, state, params=None):
    updates, new_state = inner.update(updates, state, params)
    return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

  return optax.GradientTransformation(inner.init, update)
