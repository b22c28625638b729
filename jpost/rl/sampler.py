"""Online generation (DESIGN.md §6): a jitted sampler over a preallocated, sharded KV cache.

One call = prefill of a left-padded prompt batch, then a `lax.while_loop` of one-token decode
steps that ends when every row has stopped (EOS / stop sequence) or at `max_new_tokens`.

- Prompt widths are rounded up to a bucket (`SamplingConfig.prompt_buckets`) and the jitted
  function is cached per (model, sampling config, batch, bucket, mesh, rules): prompts of
  different widths within a bucket never recompile.
- Left padding lines every row's last prompt token up at slot bucket - 1, so all rows write the
  cache at one shared index per step. Positions restart at 0 on each row's first real token and
  padding has segment 0, so the model sees exactly what `apply` sees for the unpadded row.
- Sampling log-probs are those of the temperature-scaled FULL softmax (soft-cap first, then
  / temperature, before top-k / top-p filtering): the trainer's `ForwardSpec(temperature=...)`
  log-probs of the same tokens, so importance ratios start at 1.
- With a mesh, the rows are padded to a multiple of the data-parallel devices, so the batch is
  split over them rather than replicated. Several processes (`jax.distributed`): each passes its
  own rows (the same number on every process) and gets its own rows back; the global batch is the
  processes' rows in process order, and the prompt bucket is the widest over all processes.
  Random draws depend on a row's global position (threefry is partitionable), so a run samples
  the same tokens with 1 process x 8 devices as with 2 x 4.

Einsum legend: B batch, T prompt slots (the bucket), N max_new_tokens, S cache slots, D d_model,
V vocabulary, M longest stop sequence.
"""
import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jpost import models
from jpost.models import decoder
from jpost.rl import multihost
from jpost.train import sharding

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int
  temperature: float = 1.0      # 0 = greedy
  top_p: float = 1.0
  top_k: int = 0                # 0 = off
  eos_ids: tuple[int, ...] = ()
  # Token-id sequences; a row stops once it has generated one (the stop tokens stay in it).
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  prompt_buckets: tuple[int, ...] = DEFAULT_BUCKETS
  # Decode runs in this many phases over a cache grown between them, so early tokens attend over
  # the slots filled so far instead of the whole preallocated cache (`decode_phase_ends`); each
  # phase compiles its own loop body.
  decode_phases: int = 4

  def __post_init__(self):
    # Hashable fields: the config keys the cache of jitted functions (lists come from configs).
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
    object.__setattr__(self, "stop_sequences",
                       tuple(tuple(int(i) for i in s) for s in self.stop_sequences))
    object.__setattr__(self, "prompt_buckets", tuple(sorted(int(b) for b in self.prompt_buckets)))
    problems = []
    if self.max_new_tokens < 1:
      problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      problems.append(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      problems.append(f"top_k={self.top_k} must be >= 0 (0 = off)")
    if any(not s for s in self.stop_sequences):
      problems.append("stop_sequences holds an empty sequence")
    if self.decode_phases < 1:
      problems.append(f"decode_phases={self.decode_phases} must be >= 1")
    if not self.prompt_buckets or self.prompt_buckets[0] < 1:
      problems.append(f"prompt_buckets={self.prompt_buckets} must be positive widths")
    if problems:
      raise ValueError("SamplingConfig: " + "; ".join(problems))


# Incremented each time a generate function is traced (tests check that buckets do not retrace).
_TRACES = 0


def bucket_width(width: int, buckets) -> int:
  """The smallest bucket >= width."""
  for b in sorted(buckets):
    if b >= width:
      return int(b)
  raise ValueError(f"prompt of {width} tokens is longer than the largest prompt bucket "
                   f"{max(buckets)} (SamplingConfig.prompt_buckets)")


def prompt_layout(lengths_B, width):
  """Left-padded rows of `width` slots -> positions, segment ids [B, width] int32.

  Real tokens (the last `length` slots) get positions 0.. and segment 1; padding gets 0 / 0.
  """
  pad_B1 = width - lengths_B[:, None]
  slot_BT = jnp.arange(width)[None, :]
  real_BT = slot_BT >= pad_B1
  positions_BT = jnp.where(real_BT, slot_BT - pad_B1, 0).astype(jnp.int32)
  return positions_BT, real_BT.astype(jnp.int32)


def _filter(z_BV, top_k, top_p):
  """-inf outside the kept set: the k largest, then the smallest nucleus reaching top_p.

  Both reduce to a logit floor per row, found on the k largest logits when top_k is set (a
  top-k, not a sort over the vocabulary, on every step) and on all of them otherwise.
  """
  v = z_BV.shape[-1]
  if not (0 < top_k < v) and top_p >= 1.0:
    return z_BV
  if 0 < top_k < v:
    sorted_BK = jax.lax.top_k(z_BV, top_k)[0]
  else:
    sorted_BK = -jnp.sort(-z_BV, axis=-1)
  kept_B = jnp.full(z_BV.shape[:1], sorted_BK.shape[-1])
  if top_p < 1.0:
    # Keep a token while the (renormalised) mass of the tokens before it is < top_p: the
    # smallest set reaching top_p, always including the top token.
    p_BK = jax.nn.softmax(sorted_BK, axis=-1)
    kept_B = jnp.maximum(jnp.sum((jnp.cumsum(p_BK, axis=-1) - p_BK) < top_p, axis=-1), 1)
  floor_B1 = jnp.take_along_axis(sorted_BK, kept_B[:, None] - 1, axis=-1)
  # Ties with the floor are kept (so top_k may keep more than k tokens when logits tie).
  return jnp.where(z_BV >= floor_B1, z_BV, -jnp.inf)


def _sample(a_BV, key, sc: SamplingConfig):
  """Soft-capped logits [B, V] float32 -> (tokens [B] int32, log-probs [B] float32)."""
  greedy = sc.temperature == 0
  z_BV = a_BV if greedy or sc.temperature == 1.0 else a_BV * (1.0 / sc.temperature)
  if greedy:
    tokens_B = jnp.argmax(z_BV, axis=-1)
  else:
    tokens_B = jax.random.categorical(key, _filter(z_BV, sc.top_k, sc.top_p), axis=-1)
  tokens_B = tokens_B.astype(jnp.int32)
  logp_B = jnp.take_along_axis(jax.nn.log_softmax(z_BV, axis=-1), tokens_B[:, None], -1)[:, 0]
  return tokens_B, logp_B


# A decode phase covers at least this many new tokens: shorter ones would save less attention
# reading than their extra loop body costs to compile (and short generations are prompt-bound).
MIN_PHASE_TOKENS = 64


def decode_phase_ends(max_new_tokens: int, phases: int) -> tuple[int, ...]:
  """Token counts at which the decode phases end: equal shares of `max_new_tokens` (fewer phases
  when they would cover under MIN_PHASE_TOKENS each). During the phase ending at e the cache holds
  prompt + e - 1 slots. Attention reads grow with the slots, so with P phases a long generation
  reads about (P + 1) / (2 P) of the whole-cache amount for its generated part (5/8 at P = 4)."""
  phases = max(1, min(phases, max_new_tokens // MIN_PHASE_TOKENS))
  return tuple(sorted({-(-max_new_tokens * (j + 1) // phases) for j in range(phases)}))


def _next_logits(model_cfg, lm_params, h_BD):
  """[B, V] float32 logits of the last hidden states (soft-capped): never [B, T, V]."""
  a_BV = jnp.einsum("bd,dv->bv", h_BD, models.unembedding(model_cfg, lm_params),
                    preferred_element_type=jnp.float32)
  if model_cfg.final_softcap is not None:
    a_BV = jnp.tanh(a_BV / model_cfg.final_softcap) * model_cfg.final_softcap
  return a_BV


def _generate(model_cfg, sc: SamplingConfig, rules, lm_params, prompt_BT, lengths_B, rng):
  global _TRACES
  _TRACES += 1
  with nn.logical_axis_rules(rules):
    return _generate_traced(model_cfg, sc, lm_params, prompt_BT, lengths_B, rng)


def _generate_traced(model_cfg, sc, lm_params, prompt_BT, lengths_B, rng):
  b, t = prompt_BT.shape
  n = sc.max_new_tokens
  batch = lambda x: nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))
  positions_BT, segment_ids_BT = prompt_layout(lengths_B, t)
  # The last sampled token is never fed back, so n - 1 generated slots suffice; the phase ending
  # at e feeds tokens up to e - 2 (slots < t + e - 1).
  ends = decode_phase_ends(n, sc.decode_phases)
  cache = models.init_cache(model_cfg, b, t + ends[0] - 1)
  h_BTD, cache = models.prefill(model_cfg, lm_params, prompt_BT, positions_BT, segment_ids_BT,
                                cache)
  row_segment_B1 = (lengths_B[:, None] > 0).astype(jnp.int32)
  stops = [jnp.asarray(s, jnp.int32) for s in sc.stop_sequences]
  m = max([len(s) for s in sc.stop_sequences], default=1)
  eos = jnp.asarray(sc.eos_ids or (-1,), jnp.int32)

  def emit(s, h_BD):
    """Samples token s['i'] of every live row from its last hidden state."""
    i = s["i"]
    token_B, logp_B = _sample(_next_logits(model_cfg, lm_params, h_BD),
                              jax.random.fold_in(rng, i), sc)
    live_B = ~s["done"]
    token_B = jnp.where(live_B, token_B, 0)
    logp_B = jnp.where(live_B, logp_B, 0.0)
    # The last m live tokens, -1 before the first: a stop sequence matches generated tokens only.
    recent_BM = jnp.where(live_B[:, None],
                          jnp.concatenate([s["recent"][:, 1:], token_B[:, None]], axis=1),
                          s["recent"])
    hit_B = jnp.isin(token_B, eos)
    for seq in stops:
      hit_B |= jnp.all(recent_BM[:, m - len(seq):] == seq, axis=1)
    hit_B &= live_B
    return dict(
        i=i + 1, cache=s["cache"],
        tokens=batch(jax.lax.dynamic_update_slice(s["tokens"], token_B[:, None], (0, i))),
        logps=batch(jax.lax.dynamic_update_slice(s["logps"], logp_B[:, None], (0, i))),
        lengths=s["lengths"] + live_B.astype(jnp.int32), recent=recent_BM,
        done=s["done"] | hit_B, stopped=s["stopped"] | hit_B)

  def cond(s):
    return (s["i"] < n) & ~jnp.all(s["done"])

  def body(s):
    # Feed token i - 1 (at slot t + i - 1, position length + i - 1); finished rows feed 0 and
    # their outputs are discarded by `emit`.
    i = s["i"]
    prev_B1 = jax.lax.dynamic_slice_in_dim(s["tokens"], i - 1, 1, axis=1)
    h_B1D, cache = models.decode_step(model_cfg, lm_params, prev_B1,
                                      lengths_B[:, None] + i - 1, s["cache"], t + i - 1,
                                      row_segment_B1)
    return emit({**s, "cache": cache}, h_B1D[:, 0])

  empty_B = lengths_B == 0   # padding rows: nothing to generate
  state = dict(i=jnp.int32(0), cache=cache, tokens=batch(jnp.zeros((b, n), jnp.int32)),
               logps=batch(jnp.zeros((b, n), jnp.float32)), lengths=jnp.zeros(b, jnp.int32),
               recent=jnp.full((b, m), -1, jnp.int32), done=empty_B, stopped=empty_B)
  state = emit(state, h_BTD[:, -1])
  for j, end in enumerate(ends):
    if j:
      state["cache"] = models.grow_cache(state["cache"], t + end - 1)
    state = jax.lax.while_loop(lambda s, end=end: cond(s) & (s["i"] < end), body, state)
  return {k: state[k] for k in ("tokens", "logps", "lengths", "stopped")}


def _row_shardings(mesh, rules, batch_size, width):
  """Placement of a [B, width] and a [B] array (B = the global batch): rows over the logical
  'batch' axes (a mesh axis that does not divide B is dropped: replicated)."""
  shapes = (jax.ShapeDtypeStruct((batch_size, width), jnp.int32),
            jax.ShapeDtypeStruct((batch_size,), jnp.int32))
  return sharding.logical_to_sharding((("batch", "length"), ("batch",)), mesh, rules,
                                      shapes=shapes)


@functools.lru_cache(maxsize=64)
def jitted_generate(model_cfg, sc, batch_size, bucket, mesh, rules):
  """One compiled program per shape and placement. With a mesh, every output keeps the prompt's
  row placement, so each process finds its own rows among its local shards."""
  fn = functools.partial(_generate, model_cfg, sc, rules)
  if mesh is None:
    return jax.jit(fn)
  rows_N, rows = _row_shardings(mesh, rules, batch_size, sc.max_new_tokens)
  return jax.jit(fn, out_shardings={"tokens": rows_N, "logps": rows_N, "lengths": rows,
                                    "stopped": rows})


@functools.lru_cache(maxsize=16)
def jitted_compute_weights(model_cfg):
  """`models.compute_weights` as its own program (elementwise: shardings are kept).

  Decode reads every weight once per token, so the sampler hands its program weights already in
  the compute dtype: bit-identical outputs, and a half (convert fused into the matmul) to a
  quarter (separate convert) of the weight traffic of float32 masters, for the price of a
  compute-dtype copy of the weights during sampling. The cast cannot live inside the generate
  program: XLA sinks a loop-invariant convert into the decode loop (to avoid holding both
  copies), where it then runs on every step (seen in the compiled HLO, even behind an
  optimization barrier).
  """
  return jax.jit(functools.partial(models.compute_weights, model_cfg))


def rows_multiple(mesh, rules=None) -> int:
  """What each process's row count must be a multiple of for the batch to split over the mesh's
  data-parallel devices (the logical 'batch' axes): their number / process_count."""
  rules = _context_rules(mesh, rules)
  axes = sharding.logical_to_spec(("batch",), rules)[0]
  axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  devices = int(np.prod([mesh.shape[a] for a in axes]))
  processes = jax.process_count()
  if devices % processes:
    raise ValueError(f"sampler: the batch axes {axes} of mesh {dict(mesh.shape)} span {devices} "
                     f"device(s), not a multiple of the {processes} processes: each process's "
                     f"devices must hold a block of rows of their own")
  return devices // processes


def _context_rules(mesh, rules):
  if rules is not None:
    return tuple(rules)
  return sharding.default_rules() if mesh is not None else decoder._current_rules()


def make_generate_fn(model_cfg, sc: SamplingConfig, batch: int, bucket: int, *, mesh=None,
                     rules=None):
  """fn(lm_params, prompt_BT [batch, bucket] left-padded, lengths_B, rng) -> dict of jax arrays.

  The jitted program is cached on its arguments, so calling this again is cheap. With a mesh,
  the prompt batch is placed over (data, fsdp) and the cache sharded by the logical rules
  (`sharding.default_rules()` unless given); params keep whatever sharding they have. `batch`
  counts this process's rows: with several processes the program runs on the global batch of
  all processes' rows (`jax.make_array_from_process_local_data`) and returns global arrays.
  """
  rules = _context_rules(mesh, rules)
  if mesh is None and jax.process_count() > 1:
    raise ValueError(f"generate: {jax.process_count()} processes need the mesh (their rows form "
                     "one global batch)")
  global_batch = int(batch) * jax.process_count()
  jitted = jitted_generate(model_cfg, sc, global_batch, int(bucket), mesh, rules)

  def run(lm_params, prompt_BT, lengths_B, rng):
    prompt_BT = np.asarray(prompt_BT, np.int32)
    lengths_B = np.asarray(lengths_B, np.int32)
    if prompt_BT.shape != (batch, bucket) or lengths_B.shape != (batch,):
      raise ValueError(f"generate fn for batch {batch} x bucket {bucket}: got prompt "
                       f"{prompt_BT.shape}, lengths {lengths_B.shape}")
    context = contextlib.nullcontext()
    if mesh is not None:
      context = sharding.axis_rules(rules, mesh)
      place = _row_shardings(mesh, rules, global_batch, bucket)
      prompt_BT = multihost.place_rows(prompt_BT, place[0])
      lengths_B = multihost.place_rows(lengths_B, place[1])
    with context:
      return jitted(jitted_compute_weights(model_cfg)(lm_params), prompt_BT, lengths_B, rng)

  return run


def generate(model_cfg, lm_params, prompt_tokens_BP, prompt_lengths_B, rng, sc: SamplingConfig,
             *, mesh=None, rules=None) -> dict:
  """Samples up to `sc.max_new_tokens` tokens per row.

  prompt_tokens_BP: int32 [B, P], LEFT-padded (each row's real tokens at its end, pad 0);
  prompt_lengths_B: int32 [B] (0 = a padding row: nothing generated, stopped, length 0).
  Returns numpy arrays: tokens [B, N] int32 (0 after a row stopped), logps [B, N] float32
  (log-prob under softmax(softcap(logits) / temperature), temperature 1 when greedy; 0 after
  stop), lengths [B] int32 (generated tokens, EOS / stop tokens included), stopped [B] bool
  (True: EOS or stop sequence; False: cut at max_new_tokens). Deterministic given `rng`.
  Several processes: each passes and gets back its own rows; a mesh is required (module
  docstring).
  """
  prompt_BP = np.asarray(prompt_tokens_BP, np.int32)
  lengths_B = np.asarray(prompt_lengths_B, np.int32)
  if prompt_BP.ndim != 2 or lengths_B.shape != prompt_BP.shape[:1]:
    raise ValueError(f"generate: prompt tokens {prompt_BP.shape} must be [B, P] and lengths "
                     f"{lengths_B.shape} [B]")
  b, p = prompt_BP.shape
  if lengths_B.size and (lengths_B.min() < 0 or lengths_B.max() > p):
    raise ValueError(f"generate: prompt lengths must be in [0, {p}], got {lengths_B.min()}.."
                     f"{lengths_B.max()}")
  # The bucket follows the longest real prompt (of any process: one program for all), not the
  # array width: extra left padding is free.
  width = int(multihost.gather(np.int32(max(int(lengths_B.max(initial=0)), 1))).max())
  bucket = bucket_width(width, sc.prompt_buckets)
  # Padding rows (length 0) go last, so the random draws of the real rows do not move.
  multiple = 1 if mesh is None else rows_multiple(mesh, rules)
  rows = -(-b // multiple) * multiple
  prompt_BT = np.zeros((rows, bucket), np.int32)
  keep = min(p, bucket)
  prompt_BT[:b, bucket - keep:] = prompt_BP[:, p - keep:]
  lengths_R = np.zeros(rows, np.int32)
  lengths_R[:b] = lengths_B
  prompt_BT[np.arange(bucket)[None, :] < bucket - lengths_R[:, None]] = 0   # pad is pad
  fn = make_generate_fn(model_cfg, sc, rows, bucket, mesh=mesh, rules=rules)
  out = fn(lm_params, prompt_BT, lengths_R, rng)
  own = multihost.own_rows(out["tokens"])
  if own.stop - own.start != rows:
    raise ValueError(f"generate: process {jax.process_index()} holds rows {own} of the global "
                     f"batch, not {rows} rows of its own (mesh {dict(mesh.shape)})")
  return {k: multihost.local_rows(v, own)[:b] for k, v in out.items()}
