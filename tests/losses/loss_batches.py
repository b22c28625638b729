"""Test batches for the offline losses, built from per-example token lists.

An example is a dict (or None for a padding slot): `lp` [n] the policy log-probs of its n loss
tokens, optionally `ref` [n], `kl` [n], and for KTO `mm_lp` / `mm_ref` [m] (its mismatched row).
`build` lays examples out in rows (packed when a row lists several), puts `prompt` masked tokens
before each completion and fills them with junk log-probs (a loss that forgets the mask sees them),
pads the rest (log-probs 0, seq_index -1). The NumPy references in the tests work on the lists, so
a packing or masking bug in the loss cannot cancel in the reference.

Shapes are fixed (B rows x T tokens, S example slots) so eager JAX reuses its compiled ops.
"""
import jax.numpy as jnp
import numpy as np

B, T, S = 6, 24, 8


def build(examples, layout=None, *, prompt=2, ref_seq=False, junk=-3.25, S_=S):
  """Returns (logps, batch, where); `where[i]` = (row, slice) of example i's loss tokens."""
  assert len(examples) <= S_
  if layout is None:
    layout = [[i] for i, e in enumerate(examples) if e is not None]
  assert len(layout) <= B
  f = lambda: np.zeros((B, T), np.float32)
  lp, ref, kl, mask = f(), f(), f(), f()
  seq_index = np.full((B, T), -1, np.int32)
  where = {}
  for b, row in enumerate(layout):
    t = 0
    for i in row:
      e = examples[i]
      n = len(e["lp"])
      p = e.get("prompt", prompt)
      assert t + p + n <= T, "row too long"
      seq_index[b, t:t + p + n] = i
      lp[b, t:t + p], ref[b, t:t + p], kl[b, t:t + p] = junk, junk - 1, 7.0   # masked prompt
      sl = slice(t + p, t + p + n)
      mask[b, sl] = 1.0
      lp[b, sl] = e["lp"]
      ref[b, sl] = e.get("ref", np.zeros(n))
      kl[b, sl] = e.get("kl", np.zeros(n))
      where[i] = (b, sl)
      t += p + n
  valid = np.array([e is not None for e in examples] + [False] * (S_ - len(examples)), np.float32)
  batch = {"loss_mask": mask, "seq_index": seq_index, "example_valid": valid}
  logps = {"policy": lp, "ref": ref, "kl": kl}
  if ref_seq:
    logps["ref_seq"] = np.array([np.sum(e.get("ref", 0.0)) if e is not None else 0.0
                                 for e in examples] + [0.0] * (S_ - len(examples)), np.float32)
    del logps["ref"]
  if any(e is not None and "mm_lp" in e for e in examples):
    # Mismatched rows: unpacked, row i = example i's completion after another prompt.
    mm_lp, mm_ref, mm_mask = (np.zeros((S_, T), np.float32) for _ in range(3))
    mm_seq = np.full((S_, T), -1, np.int32)
    for i, e in enumerate(examples):
      if e is None:
        continue
      n = len(e["mm_lp"])
      p = e.get("mm_prompt", prompt + 1)
      mm_seq[i, :p + n] = i
      mm_lp[i, :p], mm_ref[i, :p] = junk, junk
      mm_mask[i, p:p + n] = 1.0
      mm_lp[i, p:p + n], mm_ref[i, p:p + n] = e["mm_lp"], e["mm_ref"]
    batch.update(mismatch_loss_mask=mm_mask, mismatch_seq_index=mm_seq)
    logps.update(mismatch_policy=mm_lp, mismatch_ref=mm_ref)
  return {k: jnp.asarray(v) for k, v in logps.items()}, batch, where


def random_example(rng, n, *, with_ref=True, with_kl=False, scale=1.0):
  e = {"lp": -scale * rng.exponential(1.0, n)}
  if with_ref:
    e["ref"] = -scale * rng.exponential(1.0, n)
  if with_kl:
    e["kl"] = rng.exponential(0.3, n)
  return e


def grad_on(where, g_BT, i):
  """Gradient entries on example i's loss tokens."""
  b, sl = where[i]
  return np.asarray(g_BT)[b, sl]


def off_token_mask(where):
  """[B, T] True on every position that is not some example's loss token."""
  m = np.ones((B, T), bool)
  for b, sl in where.values():
    m[b, sl] = False
  return m
