"""Device caches: the target's paged KV cache and the draft's static context cache.

Both are tuples over layers of per-layer caches, updated functionally inside the jitted step
functions (donated, so in place). Lengths live on the host (`models.decoding`).

A layer's cache is ``(k, v)`` in the model dtype, or, with ``kv_cache_dtype`` one of int8,
float8_e4m3fn, float8_e5m2, ``(k, v, k_scales, v_scales)``: 8-bit values and one f32 scale per
(KV head, token) (`pallas_ops.quant`). `models.ops.Ops` takes and returns these tuples, so the
models never look inside them.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_ops.quant import KV_CACHE_DTYPES

SCALE_DTYPE = jnp.float32


def check_kv_cache_dtype(kv_cache_dtype):
    """None (the model dtype) or one of `pallas_ops.quant.KV_CACHE_DTYPES`; returns its name."""
    if kv_cache_dtype is None:
        return None
    name = jnp.dtype(kv_cache_dtype).name if not isinstance(kv_cache_dtype, str) else kv_cache_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be None (the model dtype) or one of "
                         f"{KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    return name


def _layer(shape, dtype, fill, kv_cache_dtype):
    if kv_cache_dtype is None:
        return (jnp.full(shape, fill, dtype), jnp.full(shape, fill, dtype))
    # four distinct buffers (the step functions donate each); scales NaN when poisoned
    return (jnp.zeros(shape, kv_cache_dtype), jnp.zeros(shape, kv_cache_dtype),
            jnp.full(shape[:-1], fill, SCALE_DTYPE), jnp.full(shape[:-1], fill, SCALE_DTYPE))


def make_paged_cache(num_layers, num_kv_heads, num_pages, page_size, head_dim, dtype,
                     fill=0.0, kv_cache_dtype=None):
    """tuple over layers of (k_pages, v_pages), each [Hkv, P, page_size, D] (8-bit: plus
    k_scales, v_scales [Hkv, P, page_size])."""
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
    return tuple(_layer(shape, dtype, fill, kv_cache_dtype) for _ in range(num_layers))


def make_context_cache(num_layers, batch, num_kv_heads, max_ctx, head_dim, dtype, fill=0.0,
                       kv_cache_dtype=None):
    """tuple over layers of (k_cache, v_cache), each [B, Hkv, S_max, D] (8-bit: plus k_scales,
    v_scales [B, Hkv, S_max])."""
    shape = (batch, num_kv_heads, max_ctx, head_dim)
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
    return tuple(_layer(shape, dtype, fill, kv_cache_dtype) for _ in range(num_layers))


def new_rows(x, cache):
    """New K or V rows as the cache takes them: in the cache dtype for a plain cache, unchanged
    (bf16 / f32, quantized by the write) for an 8-bit one."""
    return x if len(cache) == 4 else x.astype(cache[0].dtype)
