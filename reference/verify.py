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
- Filters (sampling rows only; greedy rows ignore them), on y = logits[b, j] / T, in this order:
  top-k (top_k[b] = k > 0) keeps y >= the k-th largest y (ties at the k-th value all kept; k >= V
  keeps all); top-p (top_p[b] = p < 1) keeps, of what top-k kept, the smallest set of the largest
  probabilities (renormalised over the top-k set) whose sum reaches p, ties at the boundary kept:
  y >= tau_p, tau_p the largest value v with mass(y >= v) >= p * mass(top-k set); min-p
  (min_p[b] = m > 0) keeps y >= max(y) + log(m) (probability >= m * max probability). The kept set
  is {y >= max(tau_k, tau_p, tau_m)}; everything above replaces softmax(y) by the renormalised
  p' = softmax(y) restricted to it: the Gumbel-max sample is the argmax over the kept set only,
  and the draft_probs accept test and residual use p'. Off: top_k 0, top_p 1, min_p 0.
- logprobs (return_logprobs): f32 [B, bs], for every emitted token its log-probability under the
  distribution it was emitted from: log p'(token) for sampling rows (tempered and filtered;
  accepted drafts and residual samples included: their marginal is p'), log_softmax(logits)
  (T = 1, no filter) for greedy rows; 0 where tokens is -1. top_logprobs = n > 0 adds the n
  largest log-probabilities of that same distribution per row, f32 [B, bs, n] (-inf past the
  kept set), with their token ids int32 [B, bs, n] (lowest index first among ties; -1 where the
  log-probability is -inf), for every row whether or not a token was emitted there.
"""
from __future__ import annotations

import numpy as np

from pallas_ops.verify.result import VerifyResult
from reference import rng

__all__ = ["VerifyResult", "verify_accept"]


def _sample_row(score: np.ndarray) -> int:
    return int(np.argmax(score))  # first maximum: lowest index on ties


def _lse(y: np.ndarray) -> float:
    m = y.max()
    if m == -np.inf:
        return -np.inf
    return float(m + np.log(np.exp(y - m).sum()))


def filter_threshold(y: np.ndarray, k: int = 0, p: float = 1.0, m: float = 0.0) -> float:
    """The kept set of the filters is {y >= threshold}; y float64 [V] (finite max); -inf: all
    kept. See the module docstring for the semantics."""
    V = y.shape[0]
    tau = -np.inf
    if 0 < k < V:
        tau = float(np.sort(y)[V - k])                    # the k-th largest, ties included
    if p < 1.0:
        keep = y >= tau
        w = np.exp(y - y.max())
        ys = np.sort(y[keep])[::-1]                       # kept values, descending
        cum = np.cumsum(np.exp(ys - y.max()))
        last = np.r_[ys[1:] != ys[:-1], True]              # the end of each run of equal values
        vals, mass = ys[last], cum[last]                   # mass(y >= v) per distinct value v
        reach = mass >= p * w[keep].sum()
        i = int(np.argmax(reach)) if reach.any() else len(vals) - 1
        tau = max(tau, float(vals[i]))
    if m > 0.0:
        tau = max(tau, float(y.max() + np.log(m)))
    return tau


def _param(arr, B, default, dtype):
    return np.full(B, default, dtype) if arr is None else np.asarray(arr).astype(dtype).reshape(B)


def verify_accept(logits, draft_tokens, *, temperature=None, seed=None, position=None,
                  draft_probs=None, num_seqs=None, top_k=None, top_p=None, min_p=None,
                  return_logprobs=False, top_logprobs=0) -> VerifyResult:
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
    ks = _param(top_k, B, 0, np.int64)
    ps = _param(top_p, B, 1.0, np.float64)
    ms = _param(min_p, B, 0.0, np.float64)

    num_accepted = np.zeros(B, np.int32)
    tokens = np.full((B, bs), -1, np.int32)
    logprobs = np.zeros((B, bs), np.float32)
    n_top = int(top_logprobs)
    top_lp = np.full((B, bs, n_top), -np.inf, np.float32)
    top_ids = np.full((B, bs, n_top), -1, np.int32)
    index = np.arange(V)
    for b in range(min(ns, B)):
        x = x_all[b]
        if np.isnan(x).any() or (x.max(axis=1) == -np.inf).any():
            continue
        T = temp[b]
        sampling = bool(T > 0)
        # Per row: the (tempered, filtered) log-distribution the row's token is emitted from.
        logdist = np.empty((bs, V))
        kept = np.empty((bs, V))                          # y on the kept set, -inf elsewhere
        for j in range(bs):
            if not sampling:
                logdist[j] = x[j] - _lse(x[j])
                continue
            y = x[j] / T
            tau = filter_threshold(y, int(ks[b]), float(ps[b]), float(ms[b]))
            kept[j] = np.where(y >= tau, y, -np.inf)
            logdist[j] = kept[j] - _lse(kept[j])

        def sample(j):
            if not sampling:
                return _sample_row(x[j])
            g = rng.gumbel(rng.bits(rng.row_key(seed[b], pos[b] + j), index))
            return _sample_row(kept[j] + g)

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
                p = np.exp(logdist[a])
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
        for j in range(a + 1):
            logprobs[b, j] = logdist[j, tokens[b, j]]
        if n_top:
            for j in range(bs):
                order = np.argsort(-logdist[j], kind="stable")[:n_top]
                top_lp[b, j, :len(order)] = logdist[j, order]
                top_ids[b, j, :len(order)] = np.where(logdist[j, order] > -np.inf, order, -1)
    if not return_logprobs:
        return VerifyResult(num_accepted, tokens)
    if n_top:
        return VerifyResult(num_accepted, tokens, logprobs, top_lp, top_ids)
    return VerifyResult(num_accepted, tokens, logprobs)
