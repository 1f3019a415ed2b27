"""Plain-jnp verify/accept: the same contract and random stream as the Pallas kernel.

This is the fast backend for CPU (the model layer's default off TPU) and the shared host-side
logic of the kernel: per-row parameters (`row_params`,
`row_drafts`), the one-hot accept scan (`finish_onehot`) and the draft_probs accept/residual step
(`finish_probs`, which the kernel's draft_probs path also runs after its single streaming pass).

Semantics are documented in `reference/verify.py` and `pallas_ops.verify_accept`.
Jittable with fixed shapes; `num_seqs` may be a traced int32 scalar.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_ops import rng
from pallas_ops.verify import filters
from pallas_ops.verify.result import VerifyResult
from pallas_ops.verify.validation import check_args

__all__ = ["VerifyResult", "verify_accept"]

_BIG = 2 ** 31 - 1

def row_params(B, bs, temperature, seed, position):
    """Per-row (b, j) parameters: inv_t f32 [B, bs] (1/T, or 1 for greedy rows), gscale f32
    [B, bs] (1 for sampling rows, 0 for greedy rows), key int32 [B, bs] (stream-0 row key of
    (seed, position + j)). Returns None when temperature is None (all greedy)."""
    if temperature is None:
        return None
    t = jnp.asarray(temperature, jnp.float32)
    samp = t > 0
    inv_t = jnp.where(samp, 1.0 / jnp.where(samp, t, 1.0), 1.0).astype(jnp.float32)
    seed = jnp.asarray(seed, jnp.int32)
    pos = jnp.zeros((B,), jnp.int32) if position is None else jnp.asarray(position, jnp.int32)
    rowpos = pos[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]
    key = rng.row_key(seed[:, None], rowpos, rng.STREAM_GUMBEL)
    inv_t = jnp.broadcast_to(inv_t[:, None], (B, bs))
    gscale = jnp.broadcast_to(samp[:, None].astype(jnp.float32), (B, bs))
    return inv_t, gscale, key


def row_drafts(draft_tokens, V):
    """int32 [B, bs]: the draft row j must match (d_{j+1}); -1 for invalid drafts and row bs-1."""
    d = jnp.asarray(draft_tokens).astype(jnp.int32)
    d = jnp.where((d >= 0) & (d < V), d, -1)
    return jnp.pad(d, ((0, 0), (0, 1)), constant_values=-1)


def seq_valid(B, num_seqs):
    if num_seqs is None:
        return jnp.ones((B,), bool)
    return jnp.arange(B, dtype=jnp.int32) < jnp.asarray(num_seqs, jnp.int32).reshape(())


def row_stats(logits, params, *, with_lse=False, offset=0, tau=None):
    """Per row of this vocabulary shard (global columns offset .. offset + V - 1): winner idx int32
    [B, bs] (argmax of the score, lowest index on ties, global), nan bool [B, bs] (a NaN logit),
    mx f32 [B, bs] (the winner's score), lse f32 [B, bs] of logits * inv_t (None unless
    with_lse). The noise is keyed by the global index, so shards score as the whole row would.
    tau f32 [B, bs] or None: the filters' thresholds (`filters.thresholds`): scores and lse over
    {logits * inv_t >= tau} only."""
    x = logits.astype(jnp.float32)
    B, bs, V = x.shape
    nan = jnp.isnan(x).any(-1)
    if params is None:
        y = score = x
    else:
        inv_t, gscale, key = params
        y = x * inv_t[..., None]
        if tau is not None:
            y = filters.keep(y, tau)
        index = jnp.arange(V, dtype=jnp.int32) + offset
        g = rng.gumbel(rng.bits(key[..., None], index))
        score = jnp.where(gscale[..., None] > 0, y + g, y)
    idx = jnp.argmax(score, -1).astype(jnp.int32) + offset
    mx = jnp.max(score, -1)
    lse = jax.nn.logsumexp(y, -1) if with_lse else None
    return idx, nan, mx, lse


def combine_rows(idx, nan, mx, lse, axis):
    """Row statistics of every vocabulary shard on mesh axis `axis` -> those of the whole row
    (idx, bad, lse): the highest score wins, the lowest global index among equal scores (as
    jnp.argmax), a NaN anywhere or a row of all -inf is bad; lse combined by log-sum-exp. One
    all-gather of the per-row scalars crosses the axis (not three all-reduces). axis=None: this
    shard is the whole row."""
    if axis is not None:
        f2i = lambda v: lax.bitcast_convert_type(v.astype(jnp.float32), jnp.int32)   # noqa: E731
        i2f = lambda v: lax.bitcast_convert_type(v, jnp.float32)                      # noqa: E731
        parts = [f2i(mx), idx, nan.astype(jnp.int32)] + ([f2i(lse)] if lse is not None else [])
        every = lax.all_gather(jnp.stack(parts), axis)          # [shards, 3 | 4, B, bs]
        idx, nan, mx, lse = _merge(every[:, 1], every[:, 2] > 0, i2f(every[:, 0]),
                                   None if lse is None else i2f(every[:, 3]))
    return idx, nan | (mx == -jnp.inf), lse


def _merge(idxs, nans, mxs, lses):
    """Row statistics of contiguous vocabulary parts stacked on axis 0 -> the whole row's: the
    highest score wins, the lowest global index among equal scores; NaN anywhere; lse by
    log-sum-exp (None: not computed)."""
    mx = jnp.max(mxs, 0)
    idx = jnp.min(jnp.where(mxs == mx, idxs, _BIG), 0)
    nan = jnp.any(nans, 0)
    lse = None
    if lses is not None:
        m = jnp.max(lses, 0)
        m_safe = jnp.where(m == -jnp.inf, 0.0, m)
        lse = m_safe + jnp.log(jnp.sum(jnp.exp(lses - m_safe), 0))
    return idx, nan, mx, lse


def merge_splits(idx, nan, mx, lse, splits):
    """The kernel's per-split row statistics ([splits * B, bs] each, split s at rows s * B ..)
    -> those of whole rows ([B, bs]), as `combine_rows` merges vocabulary shards."""
    if splits == 1:
        return idx, nan, mx, lse
    parts = (x.reshape((splits, -1) + x.shape[1:]) if x is not None else None
             for x in (idx, nan, mx, lse))
    return _merge(*parts)


def vocab_size(V_local, axis):
    """The whole vocabulary of a row split over mesh axis `axis` in equal contiguous shards."""
    return V_local if axis is None else V_local * lax.axis_size(axis)


def vocab_offset(V_local, axis):
    """Global vocabulary index of this shard's column 0."""
    return 0 if axis is None else lax.axis_index(axis) * V_local


def _at_index(arr, idx, offset, axis):
    """arr [..., V_local] (this shard), idx int32 [...] global -> arr at idx, from whichever shard
    holds it (max over the axis of the holder's value and -inf elsewhere)."""
    V = arr.shape[-1]
    local = idx - offset
    here = (local >= 0) & (local < V)
    val = jnp.take_along_axis(arr, jnp.clip(local, 0, V - 1)[..., None], axis=-1)[..., 0]
    val = val.astype(jnp.float32)
    if axis is None:
        return val
    return lax.pmax(jnp.where(here, val, -jnp.inf), axis)


def finish_onehot(idx, bad, drafts, valid):
    """The accept scan: a = leading matches of idx[j] == drafts[j]; tokens idx[0..a], then -1."""
    B, bs = idx.shape
    j = jnp.arange(bs, dtype=jnp.int32)[None, :]
    a = jnp.argmax(idx != drafts, axis=1).astype(jnp.int32)  # row bs-1 never matches
    return _emit(a, jnp.where(j <= a[:, None], idx, -1), bad, valid)


def _emit(a, tokens, bad, valid):
    fail = bad.any(1) | ~valid
    a = jnp.where(fail, 0, a).astype(jnp.int32)
    tokens = jnp.where(fail[:, None], -1, tokens).astype(jnp.int32)
    return VerifyResult(a, tokens)


def finish_probs(logits, draft_probs, drafts, idx, bad, lse, params, seed, position, valid,
                 temperature, *, axis=None, tau=None):
    """draft_probs path after the per-row stats: accept test, residual sample at the first
    rejection (one row of logits and q per sequence), bonus. Greedy rows use the one-hot scan.
    With `axis`, logits and draft_probs are this shard's vocabulary columns (see combine_rows):
    the draft's p and q, and the residual sample's winner, are exchanged as per-row scalars.
    tau [B, bs] or None: the filters' thresholds; p is the filtered distribution (lse over the
    kept set)."""
    B, bs, V = logits.shape
    offset = vocab_offset(V, axis)
    inv_t, _, _ = params
    samp = jnp.asarray(temperature, jnp.float32) > 0
    onehot = finish_onehot(idx, bad, drafts, valid)
    if bs == 1:
        return onehot
    seed = jnp.asarray(seed, jnp.int32)
    pos = jnp.zeros((B,), jnp.int32) if position is None else jnp.asarray(position, jnp.int32)
    d = drafts[:, :-1]                                     # [B, bs-1]
    dvalid = d >= 0
    dc = jnp.maximum(d, 0)
    x_d = _at_index(logits[:, :-1, :], dc, offset, axis)
    q_d = _at_index(draft_probs, dc, offset, axis)
    y_d = x_d * inv_t[:, :-1]
    p_d = jnp.exp(y_d - lse[:, :-1])
    if tau is not None:
        p_d = jnp.where(y_d >= tau[:, :-1], p_d, 0.0)
    jj = jnp.arange(bs - 1, dtype=jnp.int32)[None, :]
    akey = rng.row_key(seed[:, None], pos[:, None] + jj, rng.STREAM_ACCEPT)
    u = rng.uniform(rng.bits(akey, 0))
    accept = dvalid & (u * q_d < p_d)
    a = jnp.where(accept.all(1), bs - 1, jnp.argmin(accept, axis=1)).astype(jnp.int32)
    # Residual sample at row a (only meaningful when a < bs-1 and the draft was valid).
    ar = jnp.minimum(a, bs - 2)
    x_a = jnp.take_along_axis(logits, ar[:, None, None], axis=1)[:, 0, :].astype(jnp.float32)
    q_a = jnp.take_along_axis(draft_probs, ar[:, None, None], axis=1)[:, 0, :].astype(jnp.float32)
    inv_a = jnp.take_along_axis(inv_t, ar[:, None], axis=1)
    lse_a = jnp.take_along_axis(lse, ar[:, None], axis=1)
    p = jnp.exp(x_a * inv_a - lse_a)
    if tau is not None:
        tau_a = jnp.take_along_axis(tau, ar[:, None], axis=1)
        p = jnp.where(x_a * inv_a >= tau_a, p, 0.0)
    r = jnp.maximum(p - q_a, 0.0)
    gkey = rng.row_key(seed, pos + ar, rng.STREAM_GUMBEL)
    g = rng.gumbel(rng.bits(gkey[:, None], jnp.arange(V, dtype=jnp.int32)[None, :] + offset))
    rscore = jnp.where(r > 0, jnp.log(jnp.where(r > 0, r, 1.0)) + g, -jnp.inf)
    ridx = jnp.argmax(rscore, -1).astype(jnp.int32) + offset
    rpos = (r > 0).any(-1)
    if axis is not None:
        top = lax.pmax(jnp.max(rscore, -1), axis)
        ridx = lax.pmin(jnp.where(jnp.max(rscore, -1) == top, ridx, _BIG), axis)
        rpos = lax.pmax(rpos.astype(jnp.int32), axis) > 0
    use_res = (a < bs - 1) & jnp.take_along_axis(dvalid, ar[:, None], axis=1)[:, 0] & rpos
    idx_a = jnp.take_along_axis(idx, a[:, None], axis=1)[:, 0]
    last = jnp.where(use_res, ridx, idx_a)
    j = jnp.arange(bs, dtype=jnp.int32)[None, :]
    tokens = jnp.where(j < a[:, None], drafts, jnp.where(j == a[:, None], last[:, None], -1))
    sres = _emit(a, tokens, bad, valid)
    return VerifyResult(jnp.where(samp, sres.num_accepted, onehot.num_accepted),
                        jnp.where(samp[:, None], sres.tokens, onehot.tokens))


def emitted_logprobs(logits, tokens, inv_t, lse, *, axis=None):
    """f32 [B, bs]: tokens' (global ids, -1 = none) logits * inv_t - lse: the log-probability under
    the distribution whose log-normaliser is lse (an emitted token is always in the kept set);
    0 where tokens is -1. inv_t None: 1 (all greedy)."""
    V = logits.shape[-1]
    y = _at_index(logits, jnp.maximum(tokens, 0), vocab_offset(V, axis), axis)
    if inv_t is not None:
        y = y * inv_t
    return jnp.where(tokens >= 0, y - lse, 0.0).astype(jnp.float32)


def top_logprobs(logits, inv_t, tau, lse, n, fail):
    """The n largest log-probabilities per row of the emitting distribution (f32 [B, bs, n],
    -inf past its support) and their ids (int32, -1 there); rows of failed sequences (fail bool
    [B]) all -inf / -1. One more read of the logits (lax.top_k)."""
    y = logits.astype(jnp.float32)
    if inv_t is not None:
        y = y * inv_t[..., None]
    if tau is not None:
        y = filters.keep(y, tau)
    vals, ids = lax.top_k(y - lse[..., None], n)
    dead = (vals == -jnp.inf) | fail[:, None, None]
    return (jnp.where(dead, -jnp.inf, vals).astype(jnp.float32),
            jnp.where(dead, -1, ids).astype(jnp.int32))


def add_logprobs(res, logits, params, tau, lse, n_top, *, axis=None):
    """VerifyResult with logprobs (and top_logprobs / top_tokens when n_top > 0) filled in."""
    inv_t = None if params is None else params[0]
    lp = emitted_logprobs(logits, res.tokens, inv_t, lse, axis=axis)
    if not n_top:
        return res._replace(logprobs=lp)
    fail = res.tokens[:, 0] < 0
    top, ids = top_logprobs(logits, inv_t, tau, lse, n_top, fail)
    return res._replace(logprobs=lp, top_logprobs=top, top_tokens=ids)


def verify_accept(logits, draft_tokens, *, temperature=None, seed=None, position=None,
                  draft_probs=None, num_seqs=None, top_k=None, top_p=None, min_p=None,
                  return_logprobs=False, top_logprobs=0, block_sizes=None, interpret=None,
                  vocab_axis_name=None) -> VerifyResult:
    """Plain-jnp verify/accept (`block_sizes` and `interpret` are accepted and ignored).

    Args and result as `pallas_ops.verify_accept`: logits [B, bs, V] f32/bf16, draft_tokens int32
    [B, bs-1], temperature f32 [B] | None, seed int32 [B] | None, position int32 [B] | None,
    draft_probs [B, bs-1, V] | None, num_seqs int | int32 scalar | None, top_k int32 [B] | None,
    top_p f32 [B] | None, min_p f32 [B] | None, return_logprobs, top_logprobs int ->
    VerifyResult(num_accepted int32 [B], tokens int32 [B, bs][, logprobs f32 [B, bs]
    [, top_logprobs f32 [B, bs, n], top_tokens int32 [B, bs, n]]]).
    """
    del block_sizes, interpret
    B, bs, V = check_args(logits, draft_tokens, temperature, seed, position, draft_probs,
                          num_seqs, top_k=top_k, top_p=top_p, min_p=min_p,
                          return_logprobs=return_logprobs, top_logprobs=top_logprobs,
                          vocab_axis_name=vocab_axis_name)
    num_seqs = jnp.asarray(B if num_seqs is None else num_seqs, jnp.int32).reshape(())
    filt = filter_args(B, temperature, top_k, top_p, min_p)
    if vocab_axis_name is not None:   # inside shard_map: collectives need no jit of our own
        return _verify(logits, draft_tokens, temperature, seed, position, draft_probs, num_seqs,
                       filt, axis=vocab_axis_name, logprobs=bool(return_logprobs), n_top=0)
    return _verify_jit(logits, draft_tokens, temperature, seed, position, draft_probs, num_seqs,
                       filt, logprobs=bool(return_logprobs), n_top=int(top_logprobs))


def filter_args(B, temperature, top_k, top_p, min_p):
    """Filters, or None when none is given or every row is greedy (temperature None)."""
    if temperature is None:
        return None
    return filters.filter_params(B, top_k, top_p, min_p)


def _verify(logits, draft_tokens, temperature, seed, position, draft_probs, num_seqs, filt, *,
            axis, logprobs, n_top):
    B, bs, V = logits.shape
    params = row_params(B, bs, temperature, seed, position)
    drafts = row_drafts(draft_tokens, vocab_size(V, axis))
    valid = seq_valid(B, num_seqs)
    with_probs = draft_probs is not None and params is not None
    tau = None
    if filt is not None:
        samp = jnp.asarray(temperature, jnp.float32) > 0
        tau = filters.thresholds(logits, params[0], samp, filt)
    idx, nan, mx, lse = row_stats(logits, params, with_lse=with_probs or logprobs,
                                  offset=vocab_offset(V, axis), tau=tau)
    idx, bad, lse = combine_rows(idx, nan, mx, lse, axis)
    if not with_probs:
        res = finish_onehot(idx, bad, drafts, valid)
    else:
        res = finish_probs(logits, draft_probs, drafts, idx, bad, lse, params, seed, position,
                           valid, temperature, axis=axis, tau=tau)
    if logprobs:
        res = add_logprobs(res, logits, params, tau, lse, n_top, axis=axis)
    return res


_verify_jit = jax.jit(functools.partial(_verify, axis=None), static_argnames=("logprobs", "n_top"))
