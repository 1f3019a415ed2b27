"""Token sampling for the plain (non-speculative) paths: the first token after prefill and every
token of `generate_autoregressive`.

Greedy rows (temperature 0) take the argmax (lowest index on ties, as `jnp.argmax`). Sampling rows
draw by Gumbel-max from softmax(logits / T) with noise keyed by (sequence seed, position of the
token being produced), so results do not depend on batch layout. Tokens with -inf logits are
never drawn.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_tokens(logits, temperature, seed, position):
    """logits f32 [B, V]; temperature f32 [B]; seed, position int32 [B] -> int32 [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def gumbel(s, p):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0x5EED), s), p)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    g = jax.vmap(gumbel)(seed, position)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    sampled = jnp.argmax(logits / t + g, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
