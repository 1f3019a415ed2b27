"""Token sampling for the plain (non-speculative) paths, the first token after prefill and every
token of `generate_autoregressive`, and the draft model's samples (`draft_sample`).

Greedy rows (temperature 0) take the argmax (lowest index on ties, as `jnp.argmax`). Sampling rows
draw by Gumbel-max from softmax(y), y = logits * (1 / T) restricted to the kept set of the
filters (top-k, top-p, min-p: `pallas_ops.verify.filters`, semantics in `reference/verify.py`),
with the noise of `pallas_ops.rng`: the same counter-based stream `verify_accept` uses, keyed the
same way (sequence seed, position of the token the logits were computed at, vocabulary index),
and y computed as it computes it. So the sample that follows position p is one fixed function of
(seed, p, logits, filters) in both decoders: with one-hot drafts, speculative sampling accepts a
draft exactly when it equals that sample, and otherwise emits that sample as the correction, so
speculative and autoregressive sampling emit the same tokens for the same seeds (up to
floating-point differences between a verify block's logits and a decode step's). Results do not
depend on batch layout; tokens with -inf logits (or filtered out) are never drawn.

Logprobs (`return_logprobs`): the log-probability of the emitted token under the distribution it
was drawn from, as `verify_accept` reports it: log softmax(y) over the kept set for sampling rows,
log_softmax(logits) for greedy rows.

With `vocab_axis` (inside `jax.shard_map`, logits [..., V / n] this device's contiguous shard of
the vocabulary on mesh axis `vocab_axis`) the same tokens come from per-row partials: each shard's
max and the lowest global index reaching it, combined with pmax / pmin (the noise is keyed by the
global vocabulary index, so the shards draw the unsharded noise). The filters need whole rows:
not supported with `vocab_axis` (ValueError).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_ops import rng
from pallas_ops.verify import filters

_NO_INDEX = jnp.iinfo(jnp.int32).max


def _vocab_offset(n_local: int, vocab_axis):
    if vocab_axis is None:
        return 0
    return (jax.lax.axis_index(vocab_axis) * n_local).astype(jnp.int32)


def argmax_tokens(values, vocab_axis=None):
    """argmax over the last axis (lowest index on ties, as `jnp.argmax`) -> int32 [...]; with
    `vocab_axis`, over the whole vocabulary split on that mesh axis (global indices)."""
    idx = jnp.argmax(values, axis=-1).astype(jnp.int32)
    if vocab_axis is None:
        return idx
    best = jnp.max(values, axis=-1)
    idx = idx + _vocab_offset(values.shape[-1], vocab_axis)
    top = jax.lax.pmax(best, vocab_axis)
    return jax.lax.pmin(jnp.where(best == top, idx, _NO_INDEX), vocab_axis)


def _filters(B, top_k, top_p, min_p, vocab_axis):
    filt = filters.filter_params(B, top_k, top_p, min_p)
    if filt is not None and vocab_axis is not None:
        raise ValueError("top_k / top_p / min_p are not supported with a vocabulary split over "
                         f"mesh axis {vocab_axis!r} (the thresholds need whole rows)")
    return filt


def _logsumexp(y, vocab_axis):
    """log-sum-exp over the last axis (the whole vocabulary with `vocab_axis`); -inf for rows
    of all -inf."""
    m = jnp.max(y, -1)
    if vocab_axis is not None:
        m = jax.lax.pmax(m, vocab_axis)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    s = jnp.sum(jnp.exp(y - m_safe[..., None]), -1)
    if vocab_axis is not None:
        s = jax.lax.psum(s, vocab_axis)
    return m_safe + jnp.log(s)


def _at(values, tokens, vocab_axis):
    """values [..., V_local] at global token ids tokens [...] (from whichever shard holds it)."""
    V = values.shape[-1]
    local = tokens - _vocab_offset(V, vocab_axis)
    here = (local >= 0) & (local < V)
    val = jnp.take_along_axis(values, jnp.clip(local, 0, V - 1)[..., None], -1)[..., 0]
    if vocab_axis is None:
        return val
    return jax.lax.pmax(jnp.where(here, val, -jnp.inf), vocab_axis)


def one_hot(tokens, n_local: int, vocab_axis=None):
    """f32 [..., n_local]: one-hot of global token ids (this shard's columns with vocab_axis)."""
    index = jnp.arange(n_local, dtype=jnp.int32) + _vocab_offset(n_local, vocab_axis)
    return (index == jnp.asarray(tokens, jnp.int32)[..., None]).astype(jnp.float32)


def _sample(logits, temperature, seed, rowpos, stream, filt, vocab_axis):
    """logits [B, ..., V]; temperature f32 [B]; seed int32 [B]; rowpos int32 [B, ...] (the noise
    key's position per row) -> (tokens int32 [B, ...], y f32 [B, ..., V]: the log-weights of the
    distribution each token was drawn from, -inf off its support)."""
    B, V = logits.shape[0], logits.shape[-1]
    rows = (1,) * (logits.ndim - 2)              # per-sequence values broadcast over the rows
    t = jnp.asarray(temperature, jnp.float32)
    samp = t > 0
    # as verify_accept's row_params: y = logits * (1 / T), so both see the same bits
    inv_t = jnp.where(samp, 1.0 / jnp.where(samp, t, 1.0), 1.0).astype(jnp.float32)
    x = logits.astype(jnp.float32)
    y = x * inv_t.reshape((B,) + rows + (1,))
    if filt is not None:
        x3 = x.reshape(B, -1, V)
        tau = filters.thresholds(x3, jnp.broadcast_to(inv_t[:, None], x3.shape[:2]), samp, filt)
        y = filters.keep(y, tau.reshape(x.shape[:-1]))
    key = rng.row_key(jnp.asarray(seed, jnp.int32).reshape((B,) + rows),
                      jnp.asarray(rowpos, jnp.int32), stream)                  # [B, ...]
    index = jnp.arange(V, dtype=jnp.int32) + _vocab_offset(V, vocab_axis)
    g = rng.gumbel(rng.bits(key[..., None], index))                            # [B, ..., V]
    sampled = argmax_tokens(y + g, vocab_axis)
    greedy = argmax_tokens(x, vocab_axis)
    return jnp.where(samp.reshape((B,) + rows), sampled, greedy), y


def sample_tokens(logits, temperature, seed, position, *, top_k=None, top_p=None, min_p=None,
                  return_logprobs=False, vocab_axis=None):
    """logits f32 [B, V] computed at token positions `position`; temperature f32 [B]; seed,
    position int32 [B] -> int32 [B], the token for position + 1 (and, with return_logprobs, its
    log-probability f32 [B]). top_k int32 [B] (0 = off), top_p f32 [B] (1 = off), min_p f32 [B]
    (0 = off) or None: the filters of sampling rows, as `verify_accept`'s. vocab_axis: see the
    module docstring (logits [B, V / n]; no filters)."""
    B = logits.shape[0]
    filt = _filters(B, top_k, top_p, min_p, vocab_axis)
    tokens, y = _sample(logits, temperature, seed, position, rng.STREAM_GUMBEL, filt, vocab_axis)
    if not return_logprobs:
        return tokens
    return tokens, _at(y, tokens, vocab_axis) - _logsumexp(y, vocab_axis)


def draft_sample(logits, temperature, seed, position, *, top_k=None, top_p=None, min_p=None,
                 vocab_axis=None):
    """Drafts from the draft model's own tempered, filtered distribution, for full speculative
    sampling (`verify_accept(draft_probs=)`).

    logits f32 [B, n, V]: row j proposes block token j + 1 (a block starting at `position`);
    temperature f32 [B]; seed, position int32 [B]; filters as `sample_tokens`. Returns
    (tokens int32 [B, n], probs f32 [B, n, V] (this shard's columns with vocab_axis)): sampling
    rows draw token j by Gumbel-max with the noise of (seed, position + j) on `rng.STREAM_DRAFT`
    (independent of the target's streams) and probs is that distribution (softmax of the
    tempered logits over the kept set); greedy rows take the argmax and probs is its one-hot."""
    B, n, V = logits.shape
    filt = _filters(B, top_k, top_p, min_p, vocab_axis)
    rowpos = jnp.asarray(position, jnp.int32)[:, None] + jnp.arange(n, dtype=jnp.int32)
    tokens, y = _sample(logits, temperature, seed, rowpos, rng.STREAM_DRAFT, filt, vocab_axis)
    probs = jnp.exp(y - _logsumexp(y, vocab_axis)[..., None])
    samp = jnp.asarray(temperature, jnp.float32) > 0
    return tokens, jnp.where(samp[:, None, None], probs, one_hot(tokens, V, vocab_axis))
