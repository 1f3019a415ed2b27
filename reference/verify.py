"""NumPy float64 reference of verify/accept (same contract as `pallas_ops.verify_accept`).

Semantics, per sequence b (row j = 0..bs-1 of `logits[b]` scores the token after block token j;
draft d_{j+1} = draft_tokens[b, j] is the proposal for that token):

- b >= num_seqs (padding): num_accepted 0, tokens all -1.
- Invalid logits: if logits[b] contains a NaN anywhere, or some row j has every logit -inf, the
  sequence fails: num_accepted 0, tokens all -1 (no token is invented; the caller must treat the
  sequence as failed).
- A draft is valid iff 0 <= d < V. An invalid draft (-1 padding, or >= V) is rejected and never
  used as an index.
- Greedy row (temperature None, or temperature[b] <= 0, or NaN): x_j = argmax(logits[b, j]),
  lowest index on ties (as np.argmax / jnp.argmax).
- Sampling row (temperature[b] > 0): x_j = argmax_i(logits[b, j, i] / T + G(seed, position + j, i))
  with G the Gumbel noise of `reference.rng` (stream 0), lowest index on ties: one exact sample of
  softmax(logits[b, j] / T). A -inf logit scores -inf and is never chosen.
- One-hot drafts (draft_probs None) and every greedy row: a = the longest prefix with
  d_{j+1} valid and d_{j+1} == x_j; tokens = d_1..d_a, x_a, then -1.
- Sampling row with draft_probs q: for j = 0, 1, ...: with p = softmax(logits[b, j] / T) and
  d = d_{j+1}, accept iff d is valid and u_j * q[j, d] < p[d], u_j = uniform of
  (seed, position + j, index 0, stream 1), i.e. with probability min(1, p(d)/q(d)). At the first
  rejection j = a emit a sample of normalise(max(0, p - q[j])) by Gumbel-max with the stream-0 noise
  of row j; if that residual is all zero (p == q to rounding), or the draft was invalid, emit x_j
  (a sample of p). All accepted: the bonus x_{bs-1}.
"""
from __future__ import annotations

import numpy as np

from pallas_ops.verify.result import VerifyResult
from reference import rng

__all__ = ["VerifyResult", "verify_accept"]


def _sample_row(score: np.ndarray) -> int:
    return int(np.argmax(score))  # first maximum: lowest index on ties


def verify_accept(logits, draft_tokens, *, temperature=None, seed=None, position=None,
                  draft_probs=None, num_seqs=None) -> VerifyResult:
    """NumPy float64 reference; arguments as `pallas_ops.verify_accept` (no block sizes)."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, bs, V], got shape {logits.shape}")
    B, bs, V = logits.shape
    x_all = logits.astype(np.float64)
    draft_tokens = np.asarray(draft_tokens)
    if draft_tokens.shape != (B, bs - 1):
        raise ValueError(f"draft_tokens must be [B, bs-1] = {(B, bs - 1)}, got {draft_tokens.shape}")
    draft_tokens = draft_tokens.astype(np.int64)
    if temperature is not None and seed is None:
        raise ValueError("seed is required when temperature is given")
    temp = np.zeros(B) if temperature is None else np.asarray(temperature, np.float64).reshape(B)
    seed = np.zeros(B, np.int64) if seed is None else np.asarray(seed).astype(np.int64).reshape(B)
    pos = np.zeros(B, np.int64) if position is None else np.asarray(position).astype(np.int64).reshape(B)
    q_all = None if draft_probs is None else np.asarray(draft_probs).astype(np.float64)
    ns = B if num_seqs is None else int(num_seqs)

    num_accepted = np.zeros(B, np.int32)
    tokens = np.full((B, bs), -1, np.int32)
    index = np.arange(V)
    for b in range(min(ns, B)):
        x = x_all[b]
        if np.isnan(x).any() or (x.max(axis=1) == -np.inf).any():
            continue
        T = temp[b]
        sampling = bool(T > 0)

        def sample(j):
            if not sampling:
                return _sample_row(x[j])
            g = rng.gumbel(rng.bits(rng.row_key(seed[b], pos[b] + j), index))
            return _sample_row(x[j] / T + g)

        drafts = draft_tokens[b]
        a = 0
        last = None
        if q_all is None or not sampling:
            while a < bs - 1:
                d = drafts[a]
                xa = sample(a)
                if 0 <= d < V and d == xa:
                    a += 1
                else:
                    last = xa
                    break
            if last is None:
                last = sample(bs - 1)
        else:
            q = q_all[b]
            while a < bs - 1:
                d = drafts[a]
                y = x[a] / T
                p = np.exp(y - y.max())
                p /= p.sum()
                if 0 <= d < V:
                    u = rng.uniform(rng.bits(rng.row_key(seed[b], pos[b] + a, rng.STREAM_ACCEPT), 0))
                    if u * q[a, d] < p[d]:
                        a += 1
                        continue
                    r = np.maximum(p - q[a], 0.0)
                    if r.sum() > 0:
                        g = rng.gumbel(rng.bits(rng.row_key(seed[b], pos[b] + a), index))
                        with np.errstate(divide="ignore"):
                            last = _sample_row(np.log(r) + g)
                        break
                last = sample(a)
                break
            if last is None:
                last = sample(bs - 1)
        num_accepted[b] = a
        tokens[b, :a] = drafts[:a]
        tokens[b, a] = last
    return VerifyResult(num_accepted, tokens)
