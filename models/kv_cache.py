"""Device caches: the target's paged KV cache and the draft's static context cache.

Both are tuples over layers of (k, v) device arrays, updated functionally inside the jitted step
functions (donated, so in place). Lengths live on the host (`models.decoding`).
"""
from __future__ import annotations

import jax.numpy as jnp


def make_paged_cache(num_layers, num_kv_heads, num_pages, page_size, head_dim, dtype,
                     fill=0.0):
    """tuple over layers of (k_pages, v_pages), each [Hkv, P, page_size, D]."""
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    return tuple((jnp.full(shape, fill, dtype), jnp.full(shape, fill, dtype))
                 for _ in range(num_layers))


def make_context_cache(num_layers, batch, num_kv_heads, max_ctx, head_dim, dtype, fill=0.0):
    """tuple over layers of (k_cache, v_cache), each [B, Hkv, S_max, D]."""
    shape = (batch, num_kv_heads, max_ctx, head_dim)
    return tuple((jnp.full(shape, fill, dtype), jnp.full(shape, fill, dtype))
                 for _ in range(num_layers))
