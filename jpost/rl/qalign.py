"""QAlign test-time alignment (ALGORITHMS.md §7): MCMC over completions, then a majority vote.

QAlign ("Sample, Don't Search: Rethinking Test-Time Alignment for Language Models", Faria & Smith)
runs the QUEST Metropolis-Hastings chain whose stationary distribution is

    pi(y | x)  ∝  p(y | x) exp(r(x, y) / beta),

the KL-regularised optimum for reward r, using the model p only as a sampler (no logits needed):

  - state: a completion y (token ids, its EOS / stop tokens included);
  - proposal: keep the first i tokens of y with i uniform in {0, ..., |y| - 1} (QUEST's
    `randint(0, |y|)`: the last token, e.g. the EOS, is always resampled, and i = 0 resamples the
    whole completion), then sample the rest from p given prompt + y[:i]: y' = y[:i] + suffix;
  - accept with  min(1, exp(clip((r(y') - r(y)) / beta + log(|y| / |y'|), -20, 20))).
    The p terms cancel (the suffix is drawn from p); log(|y| / |y'|) is the index proposal's
    ratio q(i | y') / q(i | y) = (1/|y'|) / (1/|y|). The clip is QUEST's `logratio_clamp`.

The answer is a majority vote over the chain's states y_0..y_T (each state counts once per step it
is held, the MCMC estimate of the mode of pi's answer distribution).

Pure pieces (tested without a model): `acceptance_prob`, `run_chains` / `run_chain` (host loops
over propose / reward callables), `majority_vote`. `make_proposal` binds the jpost sampler.
"""
import collections
import dataclasses

import numpy as np

LOG_RATIO_CLIP = 20.0


def acceptance_prob(r_old, r_new, len_old, len_new, beta: float = 1.0,
                    clip: float = LOG_RATIO_CLIP):
  """min(1, exp(clip((r_new - r_old) / beta + log(len_old / len_new), -clip, clip)))
  (numpy broadcasting; a float for scalar inputs)."""
  if beta <= 0:
    raise ValueError(f"acceptance_prob: beta={beta} must be > 0")
  len_old = np.asarray(len_old, np.float64)
  len_new = np.asarray(len_new, np.float64)
  if np.any(len_old < 1) or np.any(len_new < 1):
    raise ValueError("acceptance_prob: completion lengths must be >= 1 token")
  log_ratio = (np.asarray(r_new, np.float64) - np.asarray(r_old, np.float64)) / beta \
      + np.log(len_old / len_new)
  p = np.minimum(1.0, np.exp(np.clip(log_ratio, -clip, clip)))
  return float(p) if p.ndim == 0 else p


@dataclasses.dataclass
class Chain:
  """One chain's history. states[t] / rewards[t]: the state held after step t (t = 0: the
  initial sample); steps[t - 1]: what step t proposed and whether it was accepted."""
  states: list = dataclasses.field(default_factory=list)
  rewards: list = dataclasses.field(default_factory=list)
  steps: list = dataclasses.field(default_factory=list)   # dicts: keep, len_old, len_new, ...

  @property
  def accept_rate(self) -> float:
    return float(np.mean([s["accepted"] for s in self.steps])) if self.steps else 0.0

  def accepted(self) -> list[int]:
    """Indices t of the distinct states: 0 and every step whose proposal was accepted."""
    return [0] + [t + 1 for t, s in enumerate(self.steps) if s["accepted"]]


def run_chains(propose_fn, reward_fn, y0s, steps: int, rng: np.random.Generator,
               beta: float = 1.0) -> list[Chain]:
  """Runs len(y0s) independent chains in lockstep (one batched propose / reward call per step).

  propose_fn(chain_ids, prefixes) -> suffixes: for each listed chain, a non-empty continuation of
    its kept prefix (token tuples), sampled from the model.
  reward_fn(chain_ids, completions) -> rewards: one float per listed chain.
  rng: draws the kept-prefix lengths and the accept / reject coins.
  """
  ids = list(range(len(y0s)))
  current = [tuple(y) for y in y0s]
  if any(len(y) < 1 for y in current):
    raise ValueError("run_chains: an initial completion is empty (a state needs >= 1 token)")
  r_cur = np.asarray(reward_fn(ids, current), np.float64)
  chains = [Chain([y], [float(r)]) for y, r in zip(current, r_cur)]
  for _ in range(steps):
    keep = [int(rng.integers(0, len(y))) for y in current]   # i in {0, ..., |y| - 1}
    suffixes = propose_fn(ids, [y[:k] for y, k in zip(current, keep)])
    proposals = []
    for c, (y, k, s) in enumerate(zip(current, keep, suffixes)):
      if len(s) < 1:
        raise ValueError(f"run_chains: the proposal for chain {c} has an empty suffix")
      proposals.append(y[:k] + tuple(s))
    r_new = np.asarray(reward_fn(ids, proposals), np.float64)
    len_old = np.asarray([len(y) for y in current])
    len_new = np.asarray([len(y) for y in proposals])
    p = np.atleast_1d(acceptance_prob(r_cur, r_new, len_old, len_new, beta))
    accept = rng.random(len(ids)) < p
    for c, chain in enumerate(chains):
      chain.steps.append({"keep": keep[c], "len_old": int(len_old[c]), "len_new": int(len_new[c]),
                          "reward": float(r_new[c]), "prob": float(p[c]),
                          "accepted": bool(accept[c]), "proposal": proposals[c]})
      if accept[c]:
        current[c], r_cur[c] = proposals[c], r_new[c]
      chain.states.append(current[c])
      chain.rewards.append(float(r_cur[c]))
  return chains


def run_chain(propose_fn, reward_fn, y0, steps: int, rng: np.random.Generator,
              beta: float = 1.0) -> Chain:
  """One chain: propose_fn(prefix) -> suffix, reward_fn(completion) -> float."""
  return run_chains(lambda ids, prefixes: [propose_fn(prefixes[0])],
                    lambda ids, ys: [reward_fn(ys[0])], [y0], steps, rng, beta)[0]


def majority_vote(keys):
  """-> (winner, counts): the most frequent key; None keys (no answer found) only win when
  every key is None. Ties go to the key seen first."""
  counts = collections.Counter(keys)
  ranked = [k for k in counts if k is not None] or [None]
  winner = max(ranked, key=lambda k: counts[k])   # max keeps the first of equal counts
  return winner, dict(counts)


# --------------------------------------------------------------------------- the jpost sampler

def make_proposal(model_cfg, lm_params, prompts, sc, batch_size: int, key):
  """propose_fn for run_chains from jpost.rl.sampler.generate.

  prompts[c]: chain c's prompt token ids. Each call samples, for every listed chain, a
  continuation of prompt + kept prefix, `batch_size` rows per generate call (padded to a full
  batch: one compiled program per prompt bucket). A completion's total length stays within
  sc.max_new_tokens: a suffix is cut to max_new_tokens - len(prefix) tokens, which is exactly
  what generating with that budget would have produced.
  """
  import jax

  from jpost.rl import sampler

  calls = [0]

  def propose(chain_ids, prefixes):
    out_suffixes = []
    for start in range(0, len(chain_ids), batch_size):
      rows = [list(prompts[c]) + list(p) for c, p in zip(chain_ids[start:start + batch_size],
                                                          prefixes[start:start + batch_size])]
      lengths = np.zeros(batch_size, np.int32)
      lengths[:len(rows)] = [len(r) for r in rows]
      tokens = np.zeros((batch_size, max(int(lengths.max()), 1)), np.int32)
      for j, r in enumerate(rows):
        tokens[j, tokens.shape[1] - len(r):] = r
      out = sampler.generate(model_cfg, lm_params, tokens, lengths,
                             jax.random.fold_in(key, calls[0]), sc)
      calls[0] += 1
      for j, p in enumerate(prefixes[start:start + batch_size]):
        budget = sc.max_new_tokens - len(p)
        if budget < 1:
          raise ValueError(f"make_proposal: a kept prefix of {len(p)} tokens leaves no room "
                           f"under max_new_tokens={sc.max_new_tokens}")
        n = min(int(out["lengths"][j]), budget)
        out_suffixes.append(tuple(int(t) for t in out["tokens"][j, :n]))
    return out_suffixes

  return propose
