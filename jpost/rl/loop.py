"""The online RL loop (ALGORITHMS.md §4-§5), top to bottom.

One *iteration* = sample G completions for each of `train.batch_size` prompts -> score them on the
host -> shape rewards, filter groups (DAPO) and mix in demonstrations (HPT / LUFFY / SRFT /
Prefix-RFT) -> advantages -> `rl.num_iterations` passes of `rl.mini_batches` optimiser updates with
the unified policy-gradient loss. `train.steps` counts iterations; `TrainState.step` counts
optimiser updates. Checkpoints are written between iterations, with the prompt iterator's state;
every random draw of an iteration derives from (seed, iteration), so a resumed run repeats the
uninterrupted one exactly.

Several processes (`jax.distributed`): each process owns `train.batch_size / process_count`
prompts of every prompt batch (the data pipeline's slice) and keeps their G samples: it samples
them (the sampler assembles the global batch and hands back each process's rows), scores them on
its host, computes their group advantages and passes its rows to the update, which assembles the
global batch. Logged metrics and eval numbers are reduced over all processes
(`jpost.rl.multihost`), and so is every decision that must agree (DAPO's refill rounds).

Debugging aid: JPOST_DUMP_ROLLOUTS=1 makes each process write its rows of every iteration's
rollout batch to <workdir>/rollouts/iter<i>.p<process>.npz (what the tests compare across meshes).
"""
import dataclasses
import io
import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from jpost import data as jdata
from jpost import models
from jpost.adapters import lora as lora_adapters
from jpost.checkpoints import train_ckpt
from jpost.data.encode import Encoder
from jpost.losses import policy_gradient as pg
from jpost.losses import registry
from jpost.models import heads
from jpost.rl import advantages as adv_lib
from jpost.rl import multihost
from jpost.rl import rewards as rewards_lib
from jpost.rl import rollout
from jpost.rl import sampler
from jpost.rl import schedules
from jpost.train import batches as tbatches
from jpost.train import config as tconfig
from jpost.train import forward
from jpost.train import loop as offline
from jpost.train import metrics as tmetrics
from jpost.train import optim
from jpost.train import sharding
from jpost.train import step as tstep

log = logging.getLogger(__name__)

MIXINGS = ("none", "hpt", "luffy", "srft", "prefix_rft")


# ---------------------------------------------------------------------------------------------
# Static set-up of a run
# ---------------------------------------------------------------------------------------------

def parse_rewards(spec: str) -> list[tuple]:
  """'math,regex_format*0.5' -> [(name, fn, weight)]; a user reward is 'pkg.module:function'."""
  out = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, _, weight = item.partition("*")
    out.append((name, rewards_lib.make_reward(name), float(weight or 1.0)))
  if not out:
    raise ValueError("rl.rewards is empty: name at least one reward (e.g. 'math')")
  return out


@dataclasses.dataclass
class Setup:
  """What the iterations need besides the train state (built once per run)."""
  cfg: ml_collections.ConfigDict
  pg_cfg: ml_collections.ConfigDict
  model_cfg: models.ModelConfig
  tokenizer: object
  encoder: Encoder          # demonstrations -> token ids
  scorer: rewards_lib.Scorer
  sampling: sampler.SamplingConfig
  mesh: jax.sharding.Mesh
  prompt_width: int         # sampler prompt width (prompt + Prefix-RFT prefix)
  row_width: int            # training row width T
  rows_per_group: int       # G (+1 when a demonstration row is added: HPT, SRFT)
  mixing_keys: tuple

  @property
  def group_size(self):
    return self.cfg.rl.group_size

  @property
  def local_prompts(self):
    """Prompts per iteration this process owns (its slice of every prompt batch)."""
    return self.cfg.train.batch_size // jax.process_count()


def _check_config(cfg, pg_cfg):
  rl = cfg.rl
  if pg_cfg.mixing not in MIXINGS:
    raise ValueError(f"objective.mixing={pg_cfg.mixing!r}: expected one of {MIXINGS}")
  if rl.old_logp not in ("trainer", "sampler"):
    raise ValueError(f"rl.old_logp={rl.old_logp!r}: expected 'trainer' or 'sampler'")
  if pg_cfg.advantage == "gae" and pg_cfg.vf_coef == 0:
    raise ValueError("objective.advantage='gae' needs a value head: set objective.vf_coef > 0")
  if pg_cfg.mixing == "hpt" and pg_cfg.hpt.n != rl.group_size:
    raise ValueError(f"hpt: objective.hpt.n={pg_cfg.hpt.n} must equal rl.group_size="
                     f"{rl.group_size} (the rollouts sampled per prompt)")
  processes = jax.process_count()
  if cfg.train.batch_size % processes:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} prompts do not split over "
                     f"{processes} processes")
  rows = cfg.train.batch_size // processes * _rows_per_group(cfg, pg_cfg)
  if rows % (rl.mini_batches * cfg.train.grad_accum):
    raise ValueError(f"{rows} rollout rows per iteration"
                     + (" and process" if processes > 1 else "")
                     + f" do not split into rl.mini_batches={rl.mini_batches} x "
                     f"train.grad_accum={cfg.train.grad_accum}")
  if cfg.data.rl_padding != "left":
    raise ValueError("data.rl_padding must be 'left' for online RL (the sampler left-pads)")
  if rl.max_sampling_rounds < 1:
    raise ValueError(f"rl.max_sampling_rounds={rl.max_sampling_rounds} must be >= 1")


def _rows_per_group(cfg, pg_cfg):
  return cfg.rl.group_size + (1 if pg_cfg.mixing in ("hpt", "srft") else 0)


def _make_setup(cfg, pg_cfg, model_cfg, tokenizer, mesh) -> Setup:
  rl = cfg.rl
  prompt_len = cfg.data.max_prompt_len or cfg.data.max_len
  # A Prefix-RFT prefix is at most a demonstration, which must fit in max_new_tokens.
  prefix = rl.max_new_tokens if pg_cfg.mixing == "prefix_rft" else 0
  stops = tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in rl.stop)
  sampling = sampler.SamplingConfig(
      max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
      top_k=rl.top_k, eos_ids=(tokenizer.eos_id,), stop_sequences=stops)
  scorer = rewards_lib.Scorer(parse_rewards(rl.rewards), max_workers=rl.reward_workers,
                              timeout_s=rl.reward_timeout_s)
  encoder = Encoder(tokenizer, kind="sft", chat_template=cfg.data.chat_template,
                    loss_on="completion", max_len=prompt_len + rl.max_new_tokens,
                    overlong="drop", max_prompt_len=prompt_len)
  mixing_keys = {"hpt": ("sft_mask",), "srft": ("sft_mask",), "luffy": ("offline_mask",),
                 "prefix_rft": ("prefix_mask",)}.get(pg_cfg.mixing, ())
  return Setup(cfg=cfg, pg_cfg=pg_cfg, model_cfg=model_cfg, tokenizer=tokenizer, encoder=encoder,
               scorer=scorer, sampling=sampling, mesh=mesh, prompt_width=prompt_len + prefix,
               row_width=prompt_len + prefix + rl.max_new_tokens,
               rows_per_group=_rows_per_group(cfg, pg_cfg), mixing_keys=mixing_keys)


# ---------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------

def _demonstration(setup: Setup, row: dict, prompt_ids) -> np.ndarray:
  """The row's demonstration as response token ids (EOS / end-of-turn included)."""
  where = row.get("where", "?")
  if not row.get("demonstration"):
    raise ValueError(f"{where}: objective.mixing={setup.pg_cfg.mixing!r} needs a non-empty "
                     "'demonstration' field in every prompt row")
  try:
    seq, _ = setup.encoder.prompt_completion(row["prompt"], row["demonstration"])
  except Exception as e:
    raise ValueError(f"{where}: field 'demonstration': {e} (demonstrations must fit in "
                     f"rl.max_new_tokens={setup.cfg.rl.max_new_tokens} tokens)") from None
  ids = np.asarray(seq.ids, np.int32)
  if not np.array_equal(ids[:seq.prompt_len], prompt_ids):
    raise ValueError(f"{where}: the demonstration's prompt tokens differ from the RL prompt's")
  return ids[seq.prompt_len:][np.asarray(seq.mask[seq.prompt_len:]) > 0]


def decode(tokenizer, ids) -> str:
  """Response text for the rewards. Ids past the tokenizer's vocabulary (a model's padded
  embedding rows, which an untrained policy can sample) decode to nothing."""
  ids = np.asarray(ids)
  return tokenizer.decode(ids[ids < tokenizer.vocab_size], True)


def generate(setup: Setup, lm_params, prompts: list, rng, sampling=None) -> list:
  """Samples one completion per prompt id array (None = padding) -> [Response | None]."""
  sc = sampling or setup.sampling
  tokens, lengths = rollout.left_pad(prompts, setup.prompt_width)
  out = sampler.generate(setup.model_cfg, lm_params, tokens, lengths, rng, sc, mesh=setup.mesh)
  responses = []
  for i, ids in enumerate(prompts):
    if ids is None:
      responses.append(None)
      continue
    n = int(out["lengths"][i])
    gen = out["tokens"][i, :n].astype(np.int32)
    responses.append(rollout.Response(
        prompt_ids=ids, ids=gen, sampler_logp=out["logps"][i, :n].astype(np.float32),
        stopped=bool(out["stopped"][i]), text=decode(setup.tokenizer, gen)))
  return responses


def score(setup: Setup, rows: list, responses: list):
  """-> (reward [N] incl. the no-EOS penalty, correct [N] bool, {'reward/<name>': [N]} of every
  reward, even for N = 0) for the non-None responses in order. `correct` compares the
  unpenalised reward with rl.correct_threshold."""
  rl = setup.cfg.rl
  pairs = [(row, r) for row, r in zip(rows, responses) if r is not None]
  rows_, resp = (list(x) for x in zip(*pairs)) if pairs else ([], [])
  truncated = np.array([not r.stopped for r in resp], bool)
  total, per = setup.scorer.score(rows_, [r.text for r in resp])
  correct = total >= rl.correct_threshold
  if rl.no_eos_penalty:
    total = rewards_lib.no_eos_penalty(total, truncated, rl.no_eos_penalty)
  return total, correct, {f"reward/{k}": v for k, v in per.items()}


def _sample_groups(setup: Setup, lm_params, prompt_batch, rng, np_rng, progress_frac):
  """Samples G rollouts per prompt of one prompt batch and scores them -> list of groups."""
  cfg, pg_cfg, g = setup.cfg, setup.pg_cfg, setup.group_size
  rows = prompt_batch["rows"]
  prompts = rollout.prompt_ids(prompt_batch, cfg.data.rl_padding)
  live = [i for i, p in enumerate(prompts) if p is not None]
  demos = ({i: _demonstration(setup, rows[i], prompts[i]) for i in live}
           if pg_cfg.mixing != "none" else {})
  # Prefix-RFT: the first `num_prefixed` samples of a prompt continue a demonstration prefix of
  # floor(u * L) tokens, u ~ U[low_t, high], low_t decaying by cosine over the run. The u of the
  # whole global batch are drawn and each process takes its rows', so prompts on different
  # processes get different draws and the process count does not change them.
  prefix_len = {}
  if pg_cfg.mixing == "prefix_rft":
    low = schedules.cosine_decay(progress_frac, 1.0, pg_cfg.prefix.low_start, pg_cfg.prefix.low_end)
    high, k = pg_cfg.prefix.high, pg_cfg.prefix.num_prefixed
    n, p = len(prompts), jax.process_index()
    u = np_rng.uniform(min(low, high), high, size=(n * jax.process_count(), k))[p * n:(p + 1) * n]
    if live:
      lens = schedules.prefix_lengths(u[live], [len(demos[i]) for i in live])
      prefix_len = {i: lens[j] for j, i in enumerate(live)}
  sampler_prompts = []
  for i, ids in enumerate(prompts):
    for j in range(g):
      if ids is None:
        sampler_prompts.append(None)
      elif i in prefix_len and j < len(prefix_len[i]):
        sampler_prompts.append(np.concatenate([ids, demos[i][:prefix_len[i][j]]]))
      else:
        sampler_prompts.append(ids)
  responses = generate(setup, lm_params, sampler_prompts, rng)
  for n, r in enumerate(responses):
    i, j = divmod(n, g)
    if r is not None and i in prefix_len and j < len(prefix_len[i]):
      k = int(prefix_len[i][j])
      ids = np.concatenate([demos[i][:k], r.ids])
      responses[n] = dataclasses.replace(
          r, prompt_ids=prompts[i], ids=ids, prefix_len=k,
          sampler_logp=np.concatenate([np.zeros(k, np.float32), r.sampler_logp]),
          text=decode(setup.tokenizer, ids))
  if pg_cfg.mixing == "luffy":
    # LUFFY: the demonstration replaces the group's last rollout (scored like a rollout).
    for i in live:
      responses[i * g + g - 1] = rollout.Response(
          prompt_ids=prompts[i], ids=demos[i], sampler_logp=None, source="demo_offline",
          text=decode(setup.tokenizer, demos[i]))
  reward, correct, per = score(setup, [rows[n // g] for n in range(len(responses))], responses)
  groups, n = [], 0
  for i in live:
    resp = responses[i * g:(i + 1) * g]
    groups.append({"row": rows[i], "prompt_ids": prompts[i], "responses": resp,
                   "reward": reward[n:n + g], "correct": correct[n:n + g],
                   "demo": demos.get(i)})
    n += g
  return groups, per


def _shaped_rewards(setup: Setup, group) -> np.ndarray:
  """The group's rewards with DAPO's overlong shaping on its generated lengths."""
  frac, limit = setup.pg_cfg.overlong_buffer_frac, setup.cfg.rl.max_new_tokens
  r = group["reward"].astype(np.float32)
  if frac > 0:
    lengths = [len(x.ids) - x.prefix_len if x.source == "rollout" else 0
               for x in group["responses"]]
    r = r + adv_lib.overlong_penalty(lengths, limit, max(1, round(frac * limit)))
  return r


# ---------------------------------------------------------------------------------------------
# One iteration's batch
# ---------------------------------------------------------------------------------------------

def collect(setup: Setup, lm_params, train_iter, iteration: int, total_iterations: int):
  """Samples, scores and filters until this process holds its `setup.local_prompts` groups
  -> (this process's groups, stats over all processes).

  DAPO's dynamic sampling drops all-equal groups and samples another prompt batch while any
  process is short of its share (a decision from globally reduced counts, so every process runs
  the same rounds), at most `rl.max_sampling_rounds`; a process's surplus groups are dropped.
  """
  cfg, pg_cfg = setup.cfg, setup.pg_cfg
  want = setup.local_prompts
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), iteration)
  np_rng = np.random.default_rng([cfg.train.seed, iteration])
  kept, seen, rounds = [], 0, 0
  tally = multihost.Tally()
  max_rounds = cfg.rl.max_sampling_rounds if pg_cfg.dynamic_sampling else 1
  while True:
    groups, per = _sample_groups(setup, lm_params, next(train_iter), jax.random.fold_in(key, rounds),
                                 np_rng, iteration / max(total_iterations, 1))
    rounds += 1
    for name, values in per.items():
      tally.add(name, values)
    for grp in groups:
      seen += 1
      tally.add("reward", grp["reward"])
      tally.add("correct", grp["correct"])
      sampled = [r for r in grp["responses"] if r.source == "rollout"]
      tally.add("length", [len(r.ids) - r.prefix_len for r in sampled])
      tally.add("truncated", [not r.stopped for r in sampled])
      if pg_cfg.dynamic_sampling and adv_lib.all_equal_groups(grp["reward"][None])[0]:
        continue
      kept.append(grp)
    if rounds >= max_rounds or not multihost.any_process(len(kept) < want):
      break
  kept = kept[:want]
  tally.add("kept", [1.0] * len(kept) + [0.0] * (seen - len(kept)))
  totals = tally.reduce()
  stats = {
      "rollout/reward_mean": totals.mean("reward"),
      "rollout/accuracy": totals.mean("correct"),
      "rollout/len_mean": totals.mean("length"),
      "rollout/truncated_frac": totals.mean("truncated"),
      "rollout/sampling_rounds": float(rounds),
      "rollout/kept_groups": totals.sum("kept"),
      "rollout/kept_frac": totals.mean("kept"),
  }
  stats.update({name: totals.mean(name) for name in per})
  return kept, stats


def assemble(setup: Setup, groups: list):
  """This process's groups -> (host batch [local_prompts * rows_per_group, T], per-row sequence
  advantages [rows], stats over all processes).

  HPT / SRFT groups get one extra row for the demonstration (trained with the NLL term); HPT
  trains a prompt either on its rollouts or, when at most `gate` of them are correct, on that row.
  Missing groups (dynamic sampling ran out of rounds) are padding rows.
  """
  pg_cfg, g = setup.pg_cfg, setup.group_size
  per_group = setup.rows_per_group
  responses = [None] * (setup.local_prompts * per_group)
  seq_adv = np.zeros(len(responses), np.float32)
  tally = multihost.Tally()
  use_sft = np.zeros(len(groups), bool)
  if pg_cfg.mixing == "hpt":
    if groups:
      use_sft, _ = schedules.hpt_gate(np.stack([grp["correct"] for grp in groups]),
                                      pg_cfg.hpt.gate)
    tally.add("hpt/sft_frac", use_sft)
  pg_groups = [n for n in range(len(groups)) if not use_sft[n]]
  if pg_cfg.advantage != "gae":
    rewards_PG = (np.stack([_shaped_rewards(setup, groups[n]) for n in pg_groups])
                  if pg_groups else np.zeros((0, g), np.float32))
    batch_std = (_batch_reward_std(setup, rewards_PG)
                 if pg_cfg.advantage == "grpo" and pg_cfg.adv_scale == "batch" else None)
    adv_PG, _ = adv_lib.group_advantages(
        rewards_PG, pg_cfg.advantage, scale=pg_cfg.adv_scale, eps=pg_cfg.adv_eps,
        ddof=pg_cfg.adv_std_ddof, reinforce_pm1=pg_cfg.reinforce_pm1, batch_std=batch_std)
    tally.add("pg/zero_adv_frac", adv_lib.all_equal_groups(rewards_PG))
    tally.add("pg/adv", adv_PG, squares=True)
  demo_row = 1 if per_group > g else 0
  for n, grp in enumerate(groups):
    base = n * per_group
    demo = rollout.Response(prompt_ids=grp["prompt_ids"], ids=grp["demo"], sampler_logp=None,
                            source="demo_sft") if demo_row else None
    if use_sft[n]:
      responses[base] = demo
      continue
    if pg_cfg.mixing == "srft":
      responses[base] = demo
    for j, r in enumerate(grp["responses"]):
      responses[base + demo_row + j] = r
    if pg_cfg.advantage != "gae":
      seq_adv[base + demo_row:base + demo_row + g] = adv_PG[pg_groups.index(n)]
  batch = rollout.build_batch(responses, setup.row_width, setup.mixing_keys)
  totals = tally.reduce()
  stats = {}
  if pg_cfg.mixing == "hpt":
    stats["hpt/sft_frac"] = totals.mean("hpt/sft_frac")
  if pg_cfg.advantage != "gae":
    stats.update({"pg/zero_adv_frac": totals.mean("pg/zero_adv_frac"),
                  "pg/adv_mean": totals.mean("pg/adv"), "pg/adv_std": totals.std("pg/adv")})
  return batch, seq_adv, responses, stats


def _batch_reward_std(setup: Setup, rewards_PG) -> float:
  """The std of every reward in the batch, over all processes (GRPO's scale='batch'): the
  rewards are gathered (padded to each process's share) and reduced as on one process."""
  g, ddof = setup.group_size, setup.pg_cfg.adv_std_ddof
  padded = np.full((setup.local_prompts, g), np.nan)
  padded[:len(rewards_PG)] = rewards_PG
  r = multihost.gather(padded).reshape(-1, g)
  r = r[~np.isnan(r[:, 0])]
  return float(r.std(ddof=ddof)) if r.size > ddof else 0.0


def _sequence_rewards(setup: Setup, groups, responses) -> np.ndarray:
  """Per-row scalar reward (shaped) in batch row order (GAE's terminal reward)."""
  out = np.zeros(len(responses), np.float32)
  per_group = setup.rows_per_group
  for n, grp in enumerate(groups):
    out[n * per_group:n * per_group + setup.group_size] = _shaped_rewards(setup, grp)
  return out


# ---------------------------------------------------------------------------------------------
# Pre-update statistics and the updates
# ---------------------------------------------------------------------------------------------

def _stats_spec(setup: Setup, train_spec: forward.ForwardSpec) -> forward.ForwardSpec | None:
  """What must be computed with the rollout-time params before the first update."""
  pg_cfg, rl = setup.pg_cfg, setup.cfg.rl
  several_updates = rl.num_iterations > 1 or rl.mini_batches > 1
  need_old = ((rl.old_logp == "trainer" and several_updates) or pg_cfg.kl_placement == "reward"
              or pg_cfg.mixing == "prefix_rft" and rl.old_logp == "sampler")
  need_ref = pg_cfg.kl_beta != 0 and pg_cfg.kl_placement == "reward"
  need_entropy = pg_cfg.mixing == "prefix_rft"
  need_values = pg_cfg.vf_coef != 0
  if not (need_old or need_ref or need_entropy or need_values):
    return None
  return dataclasses.replace(train_spec, needs_ref=need_ref, needs_entropy=need_entropy,
                             needs_values=need_values)


def _rollout_stats(setup, stats_fn, params, ref_params, batch, micro_rows):
  """Runs `stats_fn` over this process's rows in micro-batches (each the global batch of all
  processes' micro-batches) -> host dict of [B, T] arrays for this process's rows."""
  out = {}
  rows = batch["tokens"].shape[0]
  for start in range(0, rows, micro_rows):
    part = tbatches.to_device({k: v[start:start + micro_rows] for k, v in batch.items()},
                              setup.mesh, batch_axis=0)
    own = multihost.own_rows(part["tokens"])
    for k, v in stats_fn(params, ref_params, part).items():
      out.setdefault(k, []).append(multihost.local_rows(v, own))
  return {k: np.concatenate(v) for k, v in out.items()}


def finish_batch(setup: Setup, batch, seq_adv, groups, responses, pre):
  """Adds advantages, old log-probs, PPO targets and Prefix-RFT's keep mask to the batch."""
  pg_cfg, rl = setup.pg_cfg, setup.cfg.rl
  mask = batch["loss_mask"]
  stats = {}
  tally = multihost.Tally()
  if pre is not None and "policy" in pre and rl.old_logp == "trainer":
    batch["old_logp"] = pre["policy"]
  elif rl.old_logp == "sampler":
    # The sampler's own log-probs (vLLM-style); a Prefix-RFT prefix was not sampled, so its
    # behaviour log-probs come from the trainer at rollout time.
    old = batch["sampler_logp"]
    if "prefix_mask" in batch:
      old = np.where(batch["prefix_mask"] > 0, pre["policy"], old)
    batch["old_logp"] = old.astype(np.float32)
  if pg_cfg.advantage == "gae":
    token_rewards = adv_lib.scores_to_token_rewards(
        _sequence_rewards(setup, groups, responses), mask)
    if pg_cfg.kl_beta != 0 and pg_cfg.kl_placement == "reward":
      token_rewards = adv_lib.kl_in_reward(token_rewards, pre["policy"], pre["ref"], mask,
                                           pg_cfg.kl_beta)
      tally.add_sum("pg/kl_reward", np.sum((pre["policy"] - pre["ref"]) * mask), mask.sum())
    advantages, returns = adv_lib.gae(token_rewards, pre["values"], mask, pg_cfg.gae_gamma,
                                      pg_cfg.gae_lambda)
    if pg_cfg.whiten_advantages:
      # Over the whole batch: every process's advantages.
      moments = multihost.Tally()
      moments.add("adv", advantages[mask > 0], squares=True)
      moments = moments.reduce()
      advantages = adv_lib.masked_whiten(advantages, mask, mean=moments.mean("adv"),
                                         std=moments.std("adv"))
    batch.update(advantages=advantages, returns=returns,
                 old_values=np.where(mask > 0, pre["values"], 0.0).astype(np.float32))
    tally.add("pg/adv", advantages[mask > 0], squares=True)
    totals = tally.reduce()
    stats["pg/adv_std"] = totals.std("pg/adv")
    if pg_cfg.kl_beta != 0 and pg_cfg.kl_placement == "reward":
      stats["pg/kl_reward"] = totals.mean("pg/kl_reward")
  else:
    batch["advantages"] = adv_lib.broadcast_to_tokens(seq_adv, batch["seq_index"], mask)
  if pg_cfg.mixing == "prefix_rft":
    batch["adv_keep_mask"] = schedules.entropy_keep_mask(
        pre["entropy"], batch["prefix_mask"], pg_cfg.prefix.entropy_top_frac)
  return batch, stats


def subset_denominators(mb):
  """Global sizes of the loss's token subsets over a stacked mini-batch, all processes' rows
  ([k] arrays, the same on every process)."""
  k = mb["loss_mask"].shape[0]
  mask = mb["loss_mask"]
  sft = mb.get("sft_mask", np.zeros_like(mask)) * mask
  demo = mb.get("offline_mask", np.zeros_like(mask)) * mask
  onpol = (mask - sft) * (1.0 - demo)
  sampled = onpol * (1.0 - mb.get("prefix_mask", np.zeros_like(mask)))
  onpol_n, sampled_n = multihost.total(np.array([onpol.sum(), sampled.sum()], np.float64))
  full = lambda x: np.full((k,), max(float(x), 1.0), np.float32)
  return {"denom_onpolicy_tokens": full(onpol_n), "denom_sampled_tokens": full(sampled_n)}


def update(setup: Setup, train_step, state, ref_params, batch, iteration):
  """`rl.num_iterations` shuffled passes of `rl.mini_batches` updates -> (state, [metrics]).

  Each process shuffles its own rows (they stay on it), so with several mini-batches their
  composition depends on the process count; one mini-batch per pass keeps every row in order.
  """
  cfg, rl = setup.cfg, setup.cfg.rl
  rows = batch["tokens"].shape[0]
  per_mb = rows // rl.mini_batches
  accum = cfg.train.grad_accum
  np_rng = np.random.default_rng([cfg.train.seed, iteration, 1])
  out = []
  for _ in range(rl.num_iterations):
    order = np_rng.permutation(rows) if rl.mini_batches > 1 else np.arange(rows)
    for m in range(rl.mini_batches):
      idx = order[m * per_mb:(m + 1) * per_mb]
      micro = [{k: v[idx[j::accum]] for k, v in batch.items()} for j in range(accum)]
      mb = tbatches.stack(micro)
      mb.update(subset_denominators(mb))
      state, metrics = train_step(state, ref_params, tbatches.to_device(mb, setup.mesh))
      out.append(metrics)
  return state, out


def _combine(update_metrics):
  """Metrics of an iteration's updates -> one dict (mean; max / min for _max / _min; last for
  running counters)."""
  host = jax.device_get(update_metrics)
  out = {}
  for name in host[0]:
    values = np.array([float(m[name]) for m in host])
    if name.endswith("_max"):
      out[name] = float(values.max())
    elif name.endswith("_min"):
      out[name] = float(values.min())
    elif name in ("train/skipped_steps", "train/nonfinite_streak", "train/lr"):
      out[name] = float(values[-1])
    else:
      out[name] = float(values.mean())
  out["train/updates"] = float(len(host))
  return out


# ---------------------------------------------------------------------------------------------
# Evaluation on held-out prompts
# ---------------------------------------------------------------------------------------------

def evaluate(setup: Setup, lm_params, eval_batches) -> dict:
  """Greedy reward / accuracy / length, and pass@k and mean reward of k temperature samples, over
  every process's eval prompts (`eval_batches` holds this process's rows of each batch)."""
  cfg = setup.cfg
  k = cfg.eval.num_samples
  greedy_sc = dataclasses.replace(setup.sampling, temperature=0.0, top_p=1.0, top_k=0)
  key = jax.random.PRNGKey(cfg.train.seed + 1)
  tally = multihost.Tally()
  for n, b in enumerate(eval_batches):
    prompts = rollout.prompt_ids(b, cfg.data.rl_padding)
    resp = generate(setup, lm_params, prompts, jax.random.fold_in(key, n), greedy_sc)
    r, c, _ = score(setup, b["rows"], resp)
    live = [x for x in resp if x is not None]
    tally.add("reward", r)
    tally.add("correct", c)
    tally.add("length", [len(x.ids) for x in live])
    tally.add("truncated", [not x.stopped for x in live])
    if k > 0:
      many = [p for p in prompts for _ in range(k)]
      resp_k = generate(setup, lm_params, many, jax.random.fold_in(key, 10_000 + n))
      r_k, c_k, _ = score(setup, [row for row in b["rows"] for _ in range(k)], resp_k)
      tally.add("sample_reward", r_k)
      tally.add("pass", c_k.reshape(-1, k).any(axis=1))   # pass@k with n = k, per prompt
  totals = tally.reduce()
  out = {"eval/reward_mean": totals.mean("reward"), "eval/accuracy": totals.mean("correct"),
         "eval/len_mean": totals.mean("length"), "eval/truncated_frac": totals.mean("truncated")}
  if k > 0:
    out[f"eval/pass@{k}"] = totals.mean("pass")
    out["eval/sample_reward_mean"] = totals.mean("sample_reward")
  return out


# ---------------------------------------------------------------------------------------------
# Rollout instance filter (ALGORITHMS.md §5)
# ---------------------------------------------------------------------------------------------

def filter_prompts(setup: Setup, lm_params, workdir: str) -> str:
  """Samples `filter.k` rollouts per training prompt with the initial policy and writes the
  prompts with at least one correct (and, with `drop_all_correct`, not all correct) to
  `<workdir>/filtered_prompts.jsonl`, which then replaces `data.train`. Runs once per run (the
  file is reused on resume), not before every epoch. Several processes: each samples its slice of
  every batch, the keep flags are gathered, and each writes the same file (`.p<index>`), so all
  train on one prompt set."""
  cfg, f = setup.cfg, setup.pg_cfg.filter
  suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""
  path = os.fspath(epath.Path(workdir) / f"filtered_prompts{suffix}.jsonl")   # local or gs://
  # Sampling is collective: reuse only if every process has its file (one may have died first).
  if not multihost.any_process(not epath.Path(path).exists()):
    print(f"instance filter: reusing {path}", flush=True)
    return path
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  data_cfg.eval = cfg.data.train
  batches = jdata.make_eval_batches(data_cfg, "rl", setup.tokenizer,
                                    batch_size=cfg.train.batch_size)
  key = jax.random.PRNGKey(cfg.train.seed + 2)
  kept, total = [], 0
  for n, full in enumerate(batches):
    b = _process_slice(full)
    prompts = rollout.prompt_ids(b, cfg.data.rl_padding)
    live = [i for i, p in enumerate(prompts) if p is not None]
    resp = generate(setup, lm_params, [p for p in prompts for _ in range(f.k)],
                    jax.random.fold_in(key, n))
    _, correct, _ = score(setup, [r for r in b["rows"] for _ in range(f.k)], resp)
    keep = np.zeros(len(prompts), bool)
    keep[live] = schedules.instance_filter(correct.reshape(-1, f.k), f.drop_all_correct)[0]
    keep = multihost.gather(keep).reshape(-1)     # the whole batch's flags, in row order
    kept += [r for r, k in zip(full["rows"], keep) if k]
    total += sum(r is not None for r in full["rows"])
  if not kept:
    raise ValueError(f"instance filter: none of the {total} training prompts has a correct "
                     f"rollout in {f.k} samples; the policy cannot learn from them")
  text = "".join(json.dumps({k: v for k, v in r.items() if k != "where"}) + "\n" for r in kept)
  if tmetrics.is_remote(path):
    epath.Path(path).write_text(text)   # an object appears whole or not at all (no rename)
  else:
    tmp = path + ".tmp"
    with open(tmp, "w") as out:
      out.write(text)
    os.replace(tmp, path)              # a killed run never leaves a truncated file
  print(f"instance filter: kept {len(kept)} of {total} prompts -> {path}", flush=True)
  return path


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _dump_rollouts(workdir, iteration, batch):
  """JPOST_DUMP_ROLLOUTS=1: this process's rows of the iteration's rollout batch -> npz."""
  if os.environ.get("JPOST_DUMP_ROLLOUTS", "0") in ("", "0"):
    return
  out = epath.Path(workdir) / "rollouts"   # local or gs://: one whole object per file
  out.mkdir(parents=True, exist_ok=True)
  keep = ("tokens", "loss_mask", "advantages", "sampler_logp", "old_logp", "example_valid")
  data = io.BytesIO()
  np.savez(data, **{k: batch[k] for k in keep if k in batch})
  (out / f"iter{iteration:06d}.p{jax.process_index()}.npz").write_bytes(data.getvalue())


def _process_slice(batch: dict) -> dict:
  """This process's rows of a whole RL prompt batch (the pipeline's slice [p*b, (p+1)*b))."""
  p, n = jax.process_index(), jax.process_count()
  b = len(batch["rows"]) // n
  return {k: v[p * b:(p + 1) * b] for k, v in batch.items()}


def _value_head_axes():
  return {"w": ("embed",), "b": ()}


def run(cfg: ml_collections.ConfigDict, workdir: str, *, _summary: bool = True) -> dict:
  # --- Set-up -------------------------------------------------------------------------------
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)   # local or gs://
  is_main = jax.process_index() == 0
  if cfg.warm_start.sft_steps > 0 and cfg.model.init == "random":
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.model.init = offline._warm_start(cfg, workdir)
  objective = registry.get_objective(cfg.objective.name)
  if objective.data_kind != "rl":
    raise ValueError(f"objective {cfg.objective.name!r} is offline: use jpost.train.loop.run")
  pg_cfg = cfg.objective
  _check_config(cfg, pg_cfg)
  lora_spec = lora_adapters.spec_from_config(cfg.lora, cfg.model.param_dtype)   # None: rank 0
  needs = pg.requirements(pg_cfg)
  mesh = sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, tensor=cfg.mesh.tensor)
  rules = sharding.default_rules()
  tokenizer = jdata.make_tokenizer(cfg.data)
  model_cfg = offline._model_config(cfg, tokenizer)
  if is_main:
    tconfig.save_config(cfg, workdir)
    models.write_model_config_json(model_cfg, os.fspath(epath.Path(workdir) / "model_config.json"))
  setup = _make_setup(cfg, pg_cfg, model_cfg, tokenizer, mesh)
  if pg_cfg.loss_agg == "seq_mean_token_sum_norm" and pg_cfg.max_completion_len <= 0:
    pg_cfg = ml_collections.ConfigDict(pg_cfg.to_dict())
    pg_cfg.max_completion_len = setup.row_width - (cfg.data.max_prompt_len or cfg.data.max_len)
    setup.pg_cfg = pg_cfg
  iterations = cfg.train.steps
  updates_per_iteration = cfg.rl.num_iterations * cfg.rl.mini_batches
  total_updates = iterations * updates_per_iteration

  # --- Model, optimiser, state ---------------------------------------------------------------
  with sharding.axis_rules(rules, mesh):
    axes = {"lm": models.param_logical_axes(model_cfg)}
    shapes = {"lm": models.param_shapes(model_cfg)}
    if needs["needs_values"]:
      axes["value_head"] = _value_head_axes()
      shapes["value_head"] = jax.eval_shape(lambda: heads.init_scalar_head(model_cfg.d_model))
    param_shardings = sharding.logical_to_sharding(axes, mesh, rules, shapes=shapes)
    params = offline._initial_params(cfg, model_cfg, objective, mesh, param_shardings)
    if needs["needs_values"]:
      params["value_head"] = jax.device_put(heads.init_scalar_head(model_cfg.d_model),
                                            param_shardings["value_head"])
    if lora_spec is not None:
      # A frozen (maybe quantised) base plus trainable adapters (and value head): the sampler
      # and the trainer both run the base with the adapters attached (`forward.policy_lm`).
      params, axes, param_shardings = lora_adapters.add_adapters(
          params, axes, lora_spec, model_cfg, mesh, rules, jax.random.PRNGKey(cfg.train.seed + 1))
    optimizer = optim.make_optimizer(cfg.optim, total_updates,
                                     mask=optim.decay_mask(tstep.trainable(axes)))
    schedule = optim.make_schedule(cfg.optim, total_updates)
    # With LoRA the KL reference is the base itself (params['lm'], adapters off): no copy.
    ref_params = ({"lm": jax.tree.map(lambda x: x.copy(), params["lm"])}
                  if pg_cfg.kl_beta != 0 and lora_spec is None else None)
    init_fn = lambda p: tstep.init_state(p, optimizer, cfg.train.seed)
    abstract = jax.eval_shape(init_fn, params)
    state_shardings = offline.state_shardings_of(abstract, param_shardings, optimizer, mesh)
    state = jax.jit(init_fn, out_shardings=state_shardings)(params)
    del params

    spec = forward.ForwardSpec(model_cfg=model_cfg, needs_ref=needs["needs_ref"],
                               needs_entropy=needs["needs_entropy"],
                               needs_values=needs["needs_values"], impl=cfg.ops.impl,
                               temperature=cfg.rl.temperature or 1.0, lora=lora_spec)
    policy = lambda params: forward.policy_lm(spec, params)   # decoder params to sample from
    train_step = jax.jit(tstep.make_train_step(spec, pg.loss, pg_cfg, "examples", optimizer,
                                               schedule), donate_argnums=(0,))
    stats_spec = _stats_spec(setup, spec)
    stats_fn = (jax.jit(lambda p, r, b: forward.compute_logps(stats_spec, p, r, b))
                if stats_spec else None)

    # --- Data ----------------------------------------------------------------------------------
    if pg_cfg.filter.drop_unsolvable:
      cfg = ml_collections.ConfigDict(cfg.to_dict())
      cfg.data.train = filter_prompts(setup, policy(state.params), workdir)
      setup.cfg = cfg
    train_iter = jdata.make_train_iterator(
        cfg.data, "rl", tokenizer, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = jdata.make_eval_batches(cfg.data, "rl", tokenizer,
                                           batch_size=cfg.eval.batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())
    if cfg.eval.max_batches:
      eval_batches = eval_batches[:cfg.eval.max_batches]

    # --- Resume --------------------------------------------------------------------------------
    ckpt = train_ckpt.Checkpointer(epath.Path(workdir) / "checkpoints", keep=cfg.checkpoint.keep,
                                   async_save=cfg.checkpoint.async_save)
    meta = {"objective": cfg.objective.name, "model": repr(dataclasses.asdict(model_cfg)),
            "batch_size": cfg.train.batch_size, "group_size": cfg.rl.group_size,
            "updates_per_iteration": updates_per_iteration, "seed": cfg.train.seed}
    if lora_spec is not None:   # checkpoints then hold what trains, not the frozen base
      meta[train_ckpt.FROZEN_BASE] = offline.base_fingerprint(cfg, state.params["lm"])
    state, start = offline.resume(ckpt, state, abstract, state_shardings, meta, train_iter)

    # --- Iterations ----------------------------------------------------------------------------
    writer = tmetrics.MetricsWriter(workdir, is_main=is_main, tensorboard=cfg.log.tensorboard)
    preemption = offline._Preemption()
    preemption.install()
    n_params = sum(x.size for x in jax.tree.leaves(models.param_shapes(model_cfg)))
    print(f"model {cfg.model.name} ({n_params / 1e6:.2f}M params), objective "
          f"{cfg.objective.name}, {iterations} iterations of {cfg.train.batch_size} prompts x "
          f"{cfg.rl.group_size} samples, {updates_per_iteration} update(s) each, on "
          f"{jax.device_count()} device(s)", flush=True)

    def run_eval(it):
      out = evaluate(setup, policy(state.params), eval_batches)
      writer.write(it, out)
      print(f"eval step {it}: " + str({k: round(v, 4) for k, v in out.items()}), flush=True)
      return out

    first_eval = run_eval(start) if start == 0 and eval_batches else {}
    last_eval = first_eval
    t_start = time.time()
    it = start
    for it in range(start + 1, iterations + 1):
      t0 = time.time()
      groups, stats = collect(setup, policy(state.params), train_iter, it, iterations)
      t1 = time.time()
      batch, seq_adv, responses, mix_stats = assemble(setup, groups)
      micro_rows = batch["tokens"].shape[0] // (cfg.rl.mini_batches * cfg.train.grad_accum)
      pre = (_rollout_stats(setup, stats_fn, state.params, ref_params, batch, micro_rows)
             if stats_fn else None)
      batch, adv_stats = finish_batch(setup, batch, seq_adv, groups, responses, pre)
      _dump_rollouts(workdir, it, batch)
      state, update_metrics = update(setup, train_step, state, ref_params, batch, it)
      metrics = _combine(update_metrics)
      t2 = time.time()
      offline._test_fault_injection(it, ckpt, after_save=False)
      preempted = preemption.check(it)   # every process, every iteration: they agree on it
      metrics.update(stats)
      metrics.update(mix_stats)
      metrics.update(adv_stats)
      metrics.update({"time/sample_score_s": t1 - t0, "time/update_s": t2 - t1})
      if metrics["train/nonfinite_streak"] >= cfg.train.max_nonfinite_streak:
        raise offline.TrainingAborted(
            f"iteration {it}: {cfg.train.max_nonfinite_streak} consecutive updates had "
            "non-finite loss or gradients; check rewards and lower optim.lr")
      writer.write(it, metrics)
      if it % cfg.train.log_every == 0 or it == iterations:
        eta = (time.time() - t_start) / (it - start) * (iterations - it)
        print(f"iter {it}/{iterations}: reward {metrics['rollout/reward_mean']:.3f} "
              f"acc {metrics['rollout/accuracy']:.3f} loss {metrics['train/loss']:.4f} "
              f"len {metrics['rollout/len_mean']:.1f} "
              + "".join(f"{k.split('/')[-1]} {metrics[k]:.3f} " for k in
                        ("hpt/sft_frac", "pg/kl", "pg/clip_frac_high") if k in metrics)
              + f"({t2 - t0:.2f} s/it, eta {eta:.0f} s)", flush=True)
      if cfg.eval.every_steps and it % cfg.eval.every_steps == 0 and eval_batches:
        last_eval = run_eval(it)
      if (cfg.checkpoint.every_steps and it % cfg.checkpoint.every_steps == 0) or preempted:
        writer.flush()   # metrics.jsonl never behind a checkpoint (a remote one is rewritten)
        ckpt.save(it, state, train_iter.get_state(), meta, force=preempted)
        offline._test_fault_injection(it, ckpt)
      if preempted:
        ckpt.close()
        print(f"SIGTERM: saved iteration {it} to {ckpt.directory}; exiting cleanly", flush=True)
        return {"preempted_at": it, "workdir": workdir}

    # --- Final eval, checkpoint, export --------------------------------------------------------
    if eval_batches and it > start and (not cfg.eval.every_steps or it % cfg.eval.every_steps):
      last_eval = run_eval(it)
    if ckpt.latest_step() != it:
      writer.flush()
      ckpt.save(it, state, train_iter.get_state(), meta, force=True)
    summary = offline.finish(cfg, workdir, model_cfg, state, ckpt, writer, verbose=_summary)
    return dict(summary, first_eval=first_eval, last_eval=last_eval, steps=it)
