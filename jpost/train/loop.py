"""The offline training loop (SFT, preference, unpaired, reward models), top to bottom.

Sections: set-up -> model and state -> data -> resume -> steps (with eval, checkpoints, metrics one
step late, SIGTERM handling) -> final eval, export, summary.
"""
import dataclasses
import logging
import os
import signal

import jax
import ml_collections
import numpy as np
import optax

from jpost import data as jdata
from jpost import models
from jpost.checkpoints import train_ckpt
from jpost.losses import registry
from jpost.models import heads
from jpost.train import batches as tbatches
from jpost.train import config as tconfig
from jpost.train import forward
from jpost.train import metrics as tmetrics
from jpost.train import optim
from jpost.train import plot
from jpost.train import ref_cache
from jpost.train import sharding
from jpost.train import step as tstep

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
  pass


@dataclasses.dataclass
class _Preemption:
  """SIGTERM sets the flag; the loop saves at the next step boundary and returns."""
  requested: bool = False

  def install(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      pass


# ---------------------------------------------------------------------------------------------
# Model and state
# ---------------------------------------------------------------------------------------------

def _model_config(cfg, tokenizer):
  init = cfg.model.init
  if init.startswith("hf:"):
    model_cfg, _ = models.load_hf(init[3:], dtype=cfg.model.param_dtype, config_only=True)
  else:
    model_cfg = models.get_model_config(cfg.model.name)
  model_cfg = dataclasses.replace(model_cfg, dtype=cfg.model.dtype,
                                  param_dtype=cfg.model.param_dtype, remat=cfg.model.remat)
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but model {cfg.model.name!r} "
                     f"has vocab_size {model_cfg.vocab_size}")
  return model_cfg


def _initial_params(cfg, model_cfg, objective, mesh, param_shardings):
  init = cfg.model.init
  if init == "random":
    lm = jax.jit(lambda key: models.init_params(model_cfg, key),
                 out_shardings=param_shardings["lm"])(jax.random.PRNGKey(cfg.train.seed))
  elif init.startswith("hf:"):
    _, lm = models.load_hf(init[3:], dtype=cfg.model.param_dtype, mesh=mesh)
  elif init.startswith("ckpt:"):
    lm = jax.device_put(train_ckpt.load_params(init[5:])["lm"], param_shardings["lm"])
  else:
    raise ValueError(f"model.init={init!r}: expected 'random', 'hf:PATH' or 'ckpt:PATH'")
  params = {"lm": lm}
  if objective.head == "reward":
    params["reward_head"] = jax.device_put(heads.init_scalar_head(model_cfg.d_model),
                                           param_shardings["reward_head"])
  return params


def _logical_axes(model_cfg, objective):
  axes = {"lm": models.param_logical_axes(model_cfg)}
  if objective.head == "reward":
    axes["reward_head"] = {"w": ("embed",), "b": ()}
  return axes


def _param_shapes(model_cfg, objective):
  shapes = {"lm": models.param_shapes(model_cfg)}
  if objective.head == "reward":
    shapes["reward_head"] = jax.eval_shape(lambda: heads.init_scalar_head(model_cfg.d_model))
  return shapes


def _state_shardings(abstract_state, param_shardings, optimizer, mesh):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, param_shardings,
                              transform_non_params=lambda _: replicated)
  rest = jax.tree.map(lambda _: replicated, abstract_state)
  return rest.replace(params=param_shardings, opt_state=opt)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _warm_start(cfg, workdir):
  """Runs the SFT phase a preference recipe starts from; returns `ckpt:` init for the policy."""
  sub = ml_collections.ConfigDict(tconfig.base_config("nll").to_dict())
  for section in ("model", "mesh", "ops", "log"):
    sub[section] = cfg[section].to_dict()
  sub.data = cfg.data.to_dict()
  sub.train.update(steps=cfg.warm_start.sft_steps,
                   batch_size=cfg.warm_start.sft_batch_size or cfg.train.batch_size,
                   seed=cfg.train.seed, log_every=cfg.train.log_every)
  sub.optim.update(lr=cfg.warm_start.sft_lr, schedule="cosine",
                   weight_decay=cfg.warm_start.sft_weight_decay,
                   warmup_steps=min(20, cfg.warm_start.sft_steps // 10))
  sub.eval.update(every_steps=cfg.warm_start.sft_steps, batch_size=cfg.eval.batch_size)
  sub.checkpoint.update(every_steps=cfg.warm_start.sft_steps, keep=1)
  sub_dir = os.path.join(workdir, "warm_start_sft")
  print(f"== warm start: {cfg.warm_start.sft_steps} SFT steps on the chosen completions "
        f"-> {sub_dir}", flush=True)
  run(sub, sub_dir, _summary=False)
  return f"ckpt:{sub_dir}"


def run(cfg: ml_collections.ConfigDict, workdir: str, *, _summary: bool = True) -> dict:
  # --- Set-up -------------------------------------------------------------------------------
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if cfg.warm_start.sft_steps > 0 and cfg.model.init == "random":
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.init = _warm_start(cfg, workdir)
  objective = registry.get_objective(cfg.objective.name)
  if objective.data_kind == "rl":
    raise ValueError(f"objective {cfg.objective.name!r} is online RL: run it with "
                     "jpost.rl.loop.run (scripts/train.py picks the loop by objective)")
  precompute_ref = ref_cache.enabled(cfg, objective)   # raises where it cannot be exact
  mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
  rules = sharding.default_rules()
  tokenizer = jdata.make_tokenizer(cfg.data)
  model_cfg = _model_config(cfg, tokenizer)
  if is_main:
    tconfig.save_config(cfg, workdir)
    models.write_model_config_json(model_cfg, os.path.join(workdir, "model_config.json"))
  steps = cfg.train.steps
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                     f"train.grad_accum={cfg.train.grad_accum}")

  # --- Model, optimiser, state -----------------------------------------------------------------
  with sharding.axis_rules(rules, mesh):
    param_shardings = sharding.logical_to_sharding(
        _logical_axes(model_cfg, objective), mesh, rules, shapes=_param_shapes(model_cfg, objective))
    params = _initial_params(cfg, model_cfg, objective, mesh, param_shardings)
    optimizer = optim.make_optimizer(cfg.optim, steps,
                                     mask=optim.decay_mask(_logical_axes(model_cfg, objective)))
    schedule = optim.make_schedule(cfg.optim, steps)
    needs_ref = objective.needs_ref or objective.needs_kl or objective.needs_mismatch
    ref_params = {"lm": jax.tree.map(lambda x: x.copy(), params["lm"])} if needs_ref else None
    init_fn = lambda p: tstep.init_state(p, optimizer, cfg.train.seed,
                                         objective.init_objective_state())
    abstract = jax.eval_shape(init_fn, params)
    state_shardings = _state_shardings(abstract, param_shardings, optimizer, mesh)
    state = jax.jit(init_fn, out_shardings=state_shardings)(params)
    del params

    spec = forward.ForwardSpec(model_cfg=model_cfg, needs_ref=objective.needs_ref,
                               needs_entropy=objective.needs_entropy, needs_kl=objective.needs_kl,
                               needs_mismatch=objective.needs_mismatch, head=objective.head,
                               impl=cfg.ops.impl)
    loss_cfg = cfg.objective
    train_step = jax.jit(
        tstep.make_train_step(spec, objective.fn, loss_cfg, objective.denom_unit, optimizer,
                              schedule, objective.update_objective_state),
        donate_argnums=(0,))
    eval_step = jax.jit(tstep.make_eval_step(spec, objective.fn, loss_cfg,
                                             with_greedy=objective.data_kind == "sft"
                                             and objective.head == "lm"))

    # --- Data ----------------------------------------------------------------------------------
    train_iter = jdata.make_train_iterator(
        cfg.data, objective.data_kind, tokenizer, batch_size=cfg.train.batch_size // cfg.train.grad_accum,
        seed=cfg.train.seed, process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = jdata.make_eval_batches(cfg.data, objective.data_kind, tokenizer,
                                           batch_size=cfg.eval.batch_size)
    if cfg.eval.max_batches:
      eval_batches = eval_batches[:cfg.eval.max_batches]
    eval_batches = tbatches.with_eval_denominators(eval_batches, objective.denom_unit)
    with_ref = lambda batch: batch
    if precompute_ref:
      # S_ref per example from a one-time pass (cached under the workdir); the step then reads
      # `ref_seq_logp` and never runs the reference, so its params are released here.
      with_ref, eval_batches = ref_cache.setup(cfg, model_cfg, workdir, ref_params,
                                               train_iter.store, eval_batches, mesh)
      ref_params = None

    # --- Resume ----------------------------------------------------------------------------------
    ckpt = train_ckpt.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    meta = {"objective": cfg.objective.name, "model": dataclasses.asdict(model_cfg).__repr__(),
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seed": cfg.train.seed}
    state, start = resume(ckpt, state, abstract, state_shardings, meta, train_iter)

    # --- Steps -----------------------------------------------------------------------------------
    writer = tmetrics.MetricsWriter(workdir, is_main=is_main, tensorboard=cfg.log.tensorboard)
    n_params = sum(x.size for x in jax.tree.leaves(state.params["lm"]))
    progress = tmetrics.Progress(steps, tmetrics.train_flops_per_token(
        model_cfg, cfg.data.max_len, n_params), jax.device_count())
    preemption = _Preemption()
    preemption.install()
    print(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params), objective "
          f"{cfg.objective.name}, {steps} steps of {cfg.train.batch_size} "
          f"x{cfg.train.grad_accum} accum on {jax.device_count()} device(s)", flush=True)

    def evaluate(step):
      totals = {}
      for b in eval_batches:
        m = eval_step(state.params, ref_params, tbatches.to_device(b, mesh),
                      state.objective_state)
        for k, v in m.items():
          totals[k] = totals.get(k, 0.0) + v
      out = {f"eval/{k}": float(v) for k, v in jax.device_get(totals).items()}
      writer.write(step, out)
      shown = {k: round(v, 4) for k, v in out.items()
               if k.endswith(("/loss", "accuracy", "margin"))}
      print(f"eval step {step}: {shown}", flush=True)
      return out

    def save(step, force=False):
      ckpt.save(step, state, train_iter.get_state(), meta, force=force)

    first_eval = evaluate(start) if start == 0 and eval_batches else {}
    progress.start(start)
    pending = None          # (step, device metrics) of the previous step: fetched one step late
    window_tokens = 0       # non-padding tokens since the last progress line (counted on host)
    last_eval = first_eval
    step = start
    for step in range(start + 1, steps + 1):
      host_batch = tbatches.stack([with_ref(next(train_iter))
                                   for _ in range(cfg.train.grad_accum)])
      window_tokens += int(np.count_nonzero(host_batch["segment_ids"])) * jax.process_count()
      state, metrics = train_step(state, ref_params, tbatches.to_device(host_batch, mesh))
      if pending is not None:
        window_tokens = _check_and_log(pending, cfg, writer, progress, window_tokens)
      pending = (step, metrics)
      do_eval = cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and eval_batches
      do_save = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) \
          or preemption.requested
      if do_eval or do_save:
        # Flush this step's metrics first so a checkpoint never gets ahead of metrics.jsonl.
        window_tokens = _check_and_log(pending, cfg, writer, progress, window_tokens, force=True)
        pending = None
      if do_eval:
        last_eval = evaluate(step)
      if do_save:
        save(step, force=preemption.requested)
        _test_fault_injection(step, ckpt)
      if preemption.requested:
        ckpt.close()
        print(f"SIGTERM: saved step {step} to {ckpt.directory}; exiting cleanly", flush=True)
        return {"preempted_at": step, "workdir": workdir}
    if pending is not None:
      _check_and_log(pending, cfg, writer, progress, window_tokens, force=True)

    # --- Final eval, checkpoint, export, summary -----------------------------------------------
    if eval_batches and (not cfg.eval.every_steps or step % cfg.eval.every_steps) and step > start:
      last_eval = evaluate(step)
    if ckpt.latest_step() != step:
      save(step, force=True)
    summary = finish(cfg, workdir, model_cfg, state, ckpt, writer, verbose=_summary)
    return dict(summary, first_eval=first_eval, last_eval=last_eval, steps=step)


def resume(ckpt, state, abstract, state_shardings, meta, train_iter):
  """Restores the latest checkpoint, if any, into the state's shardings -> (state, start step)."""
  latest = ckpt.latest_step()
  if latest is None:
    return state, 0
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  state, data_state, _ = ckpt.restore(latest, abstract_sharded, meta)
  train_iter.set_state(data_state)
  print(f"resumed from {ckpt.directory}/{latest}", flush=True)
  return state, latest


def finish(cfg, workdir, model_cfg, state, ckpt, writer, *, verbose=True) -> dict:
  """Closes checkpoints and metrics, exports HF weights and plots (process 0) -> summary."""
  is_main = jax.process_index() == 0
  ckpt.close()
  writer.close()
  if cfg.export.hf_dir and is_main:
    models.save_hf(model_cfg, jax.device_get(state.params["lm"]), cfg.export.hf_dir)
  plot_path = plot.plot_metrics(writer.path) if is_main and os.path.exists(writer.path) else None
  if verbose and is_main:
    print(f"metrics:     {writer.path}\nplot:        {plot_path}\ncheckpoints: {ckpt.directory}"
          + (f"\nHF export:   {cfg.export.hf_dir}" if cfg.export.hf_dir else ""), flush=True)
  return {"workdir": workdir, "metrics": writer.path, "plot": plot_path,
          "checkpoints": ckpt.directory}


def _test_fault_injection(step, ckpt):
  """Fault injection for the resume tests: JPOST_TEST_FAULT=kill_after_save:N|kill_during_save:N.

  SIGKILL leaves no chance to clean up, exactly like a preempted VM or an OOM kill.
  """
  spec = os.environ.get("JPOST_TEST_FAULT")
  if not spec:
    return
  kind, at = spec.split(":")
  if int(at) != step:
    return
  if kind == "kill_after_save":
    ckpt.wait()
  elif kind != "kill_during_save":
    raise ValueError(f"JPOST_TEST_FAULT={spec!r}")
  os.kill(os.getpid(), signal.SIGKILL)


def _check_and_log(pending, cfg, writer, progress, window_tokens, force=False):
  """Handles the previous step's metrics (already computed, so fetching them does not stall).

  Returns the token count still to be reported (reset after each progress line).
  """
  step, metrics = pending
  if int(jax.device_get(metrics["train/nonfinite_streak"])) >= cfg.train.max_nonfinite_streak:
    raise TrainingAborted(f"step {step}: {cfg.train.max_nonfinite_streak} consecutive steps had "
                          "non-finite loss or gradients (parameters were left unchanged); "
                          "check the data and lower optim.lr")
  if not force and step % cfg.train.log_every:
    return window_tokens
  host = {k: float(v) for k, v in jax.device_get(metrics).items()}
  writer.write(step, {**host, **progress.line(step, host, tokens=window_tokens)})
  return 0
