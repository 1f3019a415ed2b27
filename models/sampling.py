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
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_ops import rng


def sample_tokens(logits, temperature, seed, position):
    """logits f32 [B, V] computed at token positions `position`; temperature f32 [B]; seed,
    position int32 [B] -> int32 [B], the token for position + 1."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    key = rng.row_key(jnp.asarray(seed, jnp.int32), jnp.asarray(position, jnp.int32),
                      rng.STREAM_GUMBEL)                                       # [B]
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    g = rng.gumbel(rng.bits(key[:, None], index[None, :]))                     # [B, V]
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sampled = jnp.argmax(logits.astype(jnp.float32) / t + g, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
