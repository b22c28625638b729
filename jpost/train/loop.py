"""The offline training loop (SFT, preference, unpaired, reward models), top to bottom.

Sections: set-up -> model and state -> data -> resume -> steps (with eval, checkpoints, metrics one
step late, SIGTERM handling) -> final eval, export, summary.
"""
import dataclasses
import logging
import os
import signal
import time

import jax
import ml_collections
import numpy as np
import optax
from etils import epath

from jpost import data as jdata
from jpost import models
from jpost.adapters import lora as lora_adapters
from jpost.checkpoints import train_ckpt
from jpost.losses import registry
from jpost.models import heads
from jpost.train import batches as tbatches
from jpost.train import config as tconfig
from jpost.train import export as texport
from jpost.train import flops
from jpost.train import forward
from jpost.train import metrics as tmetrics
from jpost.train import optim
from jpost.train import ref_cache
from jpost.train import sharding
from jpost.train import step as tstep

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
  pass


@dataclasses.dataclass
class _Preemption:
  """SIGTERM -> every process saves the same step and returns; call `check(step)` once per step.

  One process: a Python handler sets `requested`, honoured at the next step boundary.
  Several processes: SIGTERM may reach one of them, or each at a different step, and a process
  that stops alone leaves the others blocked in their next collective. JAX's preemption service
  (started by `jax.distributed.initialize`) catches SIGTERM, spreads the notice through the
  coordination service and picks the step after the furthest any process had reached;
  `reached_preemption_sync_point(step)` turns True at that step on every process. It costs no
  collective per step (an all-reduce of a local flag would block the host on the device every
  step, or, every k steps, delay the save by up to k steps). A Python handler would replace
  JAX's C++ one, so none is installed then.
  """
  requested: bool = False

  def install(self):
    if jax.process_count() > 1:
      return
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside a test runner thread)
      pass

  def check(self, step: int) -> bool:
    """Whether to save at `step` and stop; every process must call it at every step."""
    if jax.process_count() > 1 and not self.requested:
      from jax.experimental import multihost_utils
      self.requested = multihost_utils.reached_preemption_sync_point(step)
    return self.requested


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
                                  param_dtype=cfg.model.param_dtype, remat=cfg.model.remat,
                                  attention_impl=cfg.model.attention)
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
    loaded = train_ckpt.load_params(init[5:])
    if "lora" in loaded:
      raise ValueError(f"model.init={init!r} holds LoRA adapters over a frozen base: export it "
                       "with scripts/export_hf.py --adapters=merged and use model.init=hf:DIR")
    lm = jax.device_put(loaded["lm"], param_shardings["lm"])
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


def lora_base(cfg, model_cfg):
  """The frozen base of a LoRA run, built from its config as `run` builds it (`_initial_params`,
  then `add_adapters` quantises), on one device: for readers of its checkpoints, which leave the
  base out (train_ckpt.load_params). Any difference shows in `base_fingerprint`."""
  objective = registry.get_objective(cfg.objective.name)
  spec = lora_adapters.spec_from_config(cfg.lora, cfg.model.param_dtype)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  rules = sharding.default_rules()
  axes = _logical_axes(model_cfg, objective)
  with sharding.axis_rules(rules, mesh):
    shardings = sharding.logical_to_sharding(axes, mesh, rules,
                                             shapes=_param_shapes(model_cfg, objective))
    params = _initial_params(cfg, model_cfg, objective, mesh, shardings)
    params, _, _ = lora_adapters.add_adapters(params, axes, spec, model_cfg, mesh, rules,
                                              jax.random.PRNGKey(cfg.train.seed + 1))
  return params["lm"]


def base_fingerprint(cfg, lm) -> dict:
  """meta[train_ckpt.FROZEN_BASE] of a LoRA run: what its checkpoints leave out, identified."""
  return train_ckpt.base_fingerprint(
      lm, f"model.init={cfg.model.init}, lora.quantize={cfg.lora.quantize}"
      + (", lora.double_quant=True" if cfg.lora.get("double_quant") else ""))


def state_shardings_of(abstract_state, param_shardings, optimizer, mesh):
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state,
                              tstep.trainable(param_shardings),
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
  sub_dir = os.fspath(epath.Path(workdir) / "warm_start_sft")
  print(f"== warm start: {cfg.warm_start.sft_steps} SFT steps on the chosen completions "
        f"-> {sub_dir}", flush=True)
  run(sub, sub_dir, _summary=False)
  return f"ckpt:{sub_dir}"


def run(cfg: ml_collections.ConfigDict, workdir: str, *, _summary: bool = True) -> dict:
  # --- Set-up -------------------------------------------------------------------------------
  # Every file of the run goes through etils.epath, so the workdir may be gs://bucket/run.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  lora_spec = lora_adapters.spec_from_config(cfg.lora, cfg.model.param_dtype)   # None: rank 0
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
    models.write_model_config_json(model_cfg, os.fspath(epath.Path(workdir) / "model_config.json"))
  steps = cfg.train.steps
  if cfg.train.batch_size % cfg.train.grad_accum:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                     f"train.grad_accum={cfg.train.grad_accum}")

  # --- Model, optimiser, state -----------------------------------------------------------------
  with sharding.axis_rules(rules, mesh):
    param_shardings = sharding.logical_to_sharding(
        _logical_axes(model_cfg, objective), mesh, rules, shapes=_param_shapes(model_cfg, objective))
    params = _initial_params(cfg, model_cfg, objective, mesh, param_shardings)
    axes = _logical_axes(model_cfg, objective)
    if lora_spec is not None:
      # A frozen (maybe quantised) base plus trainable adapters: jpost/adapters/lora.py.
      params, axes, param_shardings = lora_adapters.add_adapters(
          params, axes, lora_spec, model_cfg, mesh, rules, jax.random.PRNGKey(cfg.train.seed + 1))
    optimizer = optim.make_optimizer(cfg.optim, steps,
                                     mask=optim.decay_mask(tstep.trainable(axes)))
    schedule = optim.make_schedule(cfg.optim, steps)
    needs_ref = objective.needs_ref or objective.needs_kl or objective.needs_mismatch
    # With LoRA the reference is the base itself (params['lm'], adapters off): no copy.
    ref_params = ({"lm": jax.tree.map(lambda x: x.copy(), params["lm"])}
                  if needs_ref and lora_spec is None else None)
    init_fn = lambda p: tstep.init_state(p, optimizer, cfg.train.seed,
                                         objective.init_objective_state())
    abstract = jax.eval_shape(init_fn, params)
    state_shardings = state_shardings_of(abstract, param_shardings, optimizer, mesh)
    state = jax.jit(init_fn, out_shardings=state_shardings)(params)
    del params

    spec = forward.ForwardSpec(model_cfg=model_cfg, needs_ref=objective.needs_ref,
                               needs_entropy=objective.needs_entropy, needs_kl=objective.needs_kl,
                               needs_mismatch=objective.needs_mismatch, head=objective.head,
                               impl=cfg.ops.impl, lora=lora_spec)
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
    eval_batches = _eval_batches(cfg, objective, tokenizer)
    with_ref = lambda batch: batch
    if precompute_ref:
      # S_ref per example from a one-time pass (cached under the workdir); the step then reads
      # `ref_seq_logp` and never runs the reference, so its params are released here.
      with_ref, eval_batches = ref_cache.setup(cfg, model_cfg, workdir,
                                               ref_params or {"lm": state.params["lm"]},
                                               train_iter.store, eval_batches, mesh)
      ref_params = None

    # --- Resume ----------------------------------------------------------------------------------
    ckpt = train_ckpt.Checkpointer(epath.Path(workdir) / "checkpoints", keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    meta = {"objective": cfg.objective.name, "model": dataclasses.asdict(model_cfg).__repr__(),
            "batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "seed": cfg.train.seed}
    if lora_spec is not None:   # checkpoints then hold what trains, not the frozen base
      meta[train_ckpt.FROZEN_BASE] = base_fingerprint(cfg, state.params["lm"])
    state, start = resume(ckpt, state, abstract, state_shardings, meta, train_iter)

    # --- Steps -----------------------------------------------------------------------------------
    writer = tmetrics.MetricsWriter(workdir, is_main=is_main, tensorboard=cfg.log.tensorboard)
    n_params = sum(x.size for x in jax.tree.leaves(models.param_shapes(model_cfg)))
    progress = tmetrics.Progress(steps, step_flops_per_token(cfg, spec, precompute_ref),
                                 jax.device_count())
    preemption = _Preemption()
    preemption.install()
    print(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params), objective "
          f"{cfg.objective.name}, {steps} steps of {cfg.train.batch_size} "
          f"x{cfg.train.grad_accum} accum on {jax.device_count()} device(s)", flush=True)

    def evaluate(step):
      totals = {}
      for b in eval_batches:
        m = eval_step(state.params, ref_params, tbatches.to_device(b, mesh, batch_axis=0),
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
      writer.flush()   # metrics.jsonl never behind a checkpoint (matters for remote workdirs)
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
      state, metrics = train_step(state, ref_params, tbatches.to_device(host_batch, mesh))
      if pending is not None:
        window_tokens = _check_and_log(pending, cfg, writer, progress, window_tokens)
      # Counted after the previous step's line, so each line reports its own steps' tokens.
      window_tokens += int(np.count_nonzero(host_batch["segment_ids"])) * jax.process_count()
      pending = (step, metrics)
      _test_fault_injection(step, ckpt, after_save=False)
      preempted = preemption.check(step)
      do_eval = cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and eval_batches
      do_save = (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) \
          or preempted
      if do_eval or do_save:
        # Flush this step's metrics first so a checkpoint never gets ahead of metrics.jsonl.
        window_tokens = _check_and_log(pending, cfg, writer, progress, window_tokens, force=True)
        pending = None
      if do_eval:
        last_eval = evaluate(step)
      if do_save:
        save(step, force=preempted)
        _test_fault_injection(step, ckpt)
      if preempted:
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


def _eval_batches(cfg, objective, tokenizer):
  """This process's rows of each eval batch, with the denominators of the whole eval set.

  Like training batches, each process builds its slice of every global batch, so the eval work is
  split across processes, not repeated (a full copy per process would be counted P times).
  """
  batches = jdata.make_eval_batches(cfg.data, objective.data_kind, tokenizer,
                                    batch_size=cfg.eval.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  if cfg.eval.max_batches:
    batches = batches[:cfg.eval.max_batches]
  if jax.process_count() == 1 or not batches:   # every process has the same number of batches
    return tbatches.with_eval_denominators(batches, objective.denom_unit)
  # What with_eval_denominators computes, summed over the processes' slices.
  from jax.experimental import multihost_utils
  local = np.array([sum(float(np.sum(b["loss_mask"])) for b in batches),
                    sum(float(np.sum(b["example_valid"])) for b in batches)], np.float32)
  tokens, examples = np.asarray(multihost_utils.process_allgather(local), np.float64).reshape(
      -1, 2).sum(0)
  if objective.denom_unit == "pairs":
    examples /= 2
  return [dict(b, denom_tokens=np.float32(max(tokens, 1.0)),
               denom_examples=np.float32(max(examples, 1.0))) for b in batches]


def step_flops_per_token(cfg, spec: forward.ForwardSpec, precompute_ref: bool) -> float:
  """Model FLOPs per token of a train step (jpost/train/flops.py), tokens at `data.max_len`:
  training the policy (no base weight gradients with LoRA), plus the reference forward when the
  step runs it, plus KTO's mismatched pairs (a policy and a reference forward, no gradient).
  Reward models are counted with the unembedding they do not run (D x V per token, a few %)."""
  reference = (spec.needs_ref and not precompute_ref) or spec.needs_kl
  return flops.train_flops_per_token(
      spec.model_cfg, cfg.data.max_len, extra_forwards=int(reference) + 2 * spec.needs_mismatch,
      frozen_base=spec.lora is not None)


def resume(ckpt, state, abstract, state_shardings, meta, train_iter):
  """Restores the latest checkpoint, if any, into the state's shardings -> (state, start step)."""
  latest = ckpt.latest_step()
  if latest is None:
    return state, 0
  abstract_sharded = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
  # A LoRA run's checkpoints leave out the frozen base: this run's own (checked) goes back in.
  base = state.params["lm"] if train_ckpt.FROZEN_BASE in meta else None
  state, data_states, _ = ckpt.restore(latest, abstract_sharded, meta, base=base)
  try:
    train_iter.set_state_from_processes(data_states)
  except ValueError as e:
    raise train_ckpt.IncompatibleCheckpoint(f"{ckpt.directory}/{latest}: {e}") from e
  print(f"resumed from {ckpt.directory}/{latest}"
        + (f" (saved by {len(data_states)} processes, now {jax.process_count()})"
           if len(data_states) != jax.process_count() else ""), flush=True)
  return state, latest


def finish(cfg, workdir, model_cfg, state, ckpt, writer, *, verbose=True) -> dict:
  """Closes checkpoints and metrics, exports HF weights and plots (process 0) -> summary."""
  is_main = jax.process_index() == 0
  ckpt.close()
  writer.close()
  if cfg.export.hf_dir:
    # Streamed tensor by tensor: a collective per tensor (every process takes part), process 0
    # writes, about one tensor in host memory; LoRA adapters are merged per layer on the way.
    texport.save_hf(state.params, cfg.get("lora"), model_cfg, cfg.export.hf_dir,
                    max_shard_bytes=cfg.export.get("max_shard_bytes", 5 * 2**30))
  plot_path = None
  if is_main and cfg.log.plot and writer.path.exists():
    from jpost.train import plot   # matplotlib: ~1 s of imports, paid only when plotting
    plot_path = plot.plot_metrics(writer.path)
  if verbose and is_main:
    print(f"metrics:     {writer.path}\nplot:        {plot_path}\ncheckpoints: {ckpt.directory}"
          + (f"\nHF export:   {cfg.export.hf_dir}" if cfg.export.hf_dir else ""), flush=True)
  return {"workdir": workdir, "metrics": os.fspath(writer.path), "plot": plot_path,
          "checkpoints": ckpt.directory}


def _test_fault_injection(step, ckpt, *, after_save=True):
  """Fault injection for the resume tests, JPOST_TEST_FAULT=KIND:STEP:

  kill_after_save / kill_during_save (called after the save of STEP): SIGKILL, which leaves no
  chance to clean up, exactly like a preempted VM or an OOM kill. sigterm (called after STEP's
  train step): SIGTERM to this process alone, then a pause that lets JAX's preemption service
  spread the notice (it takes ~0.6 s on CPU) while the other processes wait in the next step's
  collectives, so the agreed step falls within a short test run; the protocol does not depend on
  the pause.
  """
  spec = os.environ.get("JPOST_TEST_FAULT")
  if not spec:
    return
  kind, at = spec.split(":")
  if kind not in ("kill_after_save", "kill_during_save", "sigterm"):
    raise ValueError(f"JPOST_TEST_FAULT={spec!r}")
  if int(at) != step or (kind == "sigterm") == after_save:
    return
  if kind == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
    if jax.process_count() > 1:
      time.sleep(2)
    return
  if kind == "kill_after_save":
    ckpt.wait()
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
