"""Token sampling for the plain (non-speculative) paths: the first token after prefill and every
token of `generate_autoregressive`.

Greedy rows (temperature 0) take the argmax (lowest index on ties, as `jnp.argmax`). Sampling rows
draw by Gumbel-max from softmax(logits / T), with the noise of `pallas_ops.rng`: the same
counter-based stream `verify_accept` uses, keyed the same way (sequence seed, position of the
token the logits were computed at, vocabulary index). So the sample that follows position p is one
fixed function of (seed, p, logits) in both decoders: with one-hot drafts, speculative sampling
accepts a draft exactly when it equals that sample, and otherwise emits that sample as the
correction, so speculative and autoregressive sampling emit the same tokens for the same seeds
(up to floating-point differences between a verify block's logits and a decode step's). Results
do not depend on batch layout; tokens with -inf logits are never drawn.

With `vocab_axis` (inside `jax.shard_map`, logits [..., V / n] this device's contiguous shard of
the vocabulary on mesh axis `vocab_axis`) the same tokens come from per-row partials: each shard's
max and the lowest global index reaching it, combined with pmax / pmin (the noise is keyed by the
global vocabulary index, so the shards draw the unsharded noise).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_ops import rng

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


def sample_tokens(logits, temperature, seed, position, *, vocab_axis=None):
    """logits f32 [B, V] computed at token positions `position`; temperature f32 [B]; seed,
    position int32 [B] -> int32 [B], the token for position + 1. vocab_axis: see the module
    docstring (logits [B, V / n])."""
    greedy = argmax_tokens(logits, vocab_axis)
    key = rng.row_key(jnp.asarray(seed, jnp.int32), jnp.asarray(position, jnp.int32),
                      rng.STREAM_GUMBEL)                                       # [B]
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32) + _vocab_offset(logits.shape[-1],
                                                                          vocab_axis)
    g = rng.gumbel(rng.bits(key[:, None], index[None, :]))                     # [B, V]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sampled = argmax_tokens(logits.astype(jnp.float32) / t + g, vocab_axis)
    return jnp.where(temperature > 0, sampled, greedy)
