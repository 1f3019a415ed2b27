"""Input validation shared by `block_attention` / `append_context` (Pallas and XLA versions).

Static facts (ranks, shapes, dtypes, divisibility, head dims, block size range, the scales of a
quantized cache) raise `ValueError` naming the argument before any kernel runs. Dynamic facts
(lengths within the cache capacity) are checked on the host when the lengths are host values
(NumPy arrays, lists), or on request (`validate=True` / `check_block_attention_inputs`), which
fetches device arrays to the host.

Cache dtypes: q's dtype (bf16/f32), or a quantized dtype of `pallas_ops.quant.KV_CACHE_DTYPES`
(int8, float8_e4m3fn, float8_e5m2) with `k_scales` / `v_scales` [B, Hkv, S_max] (both f32 or
both bf16). The Pallas kernels DMA cache rows in whole HBM tiles: (8|16, 128) for 32/16-bit
caches (S_max % 8 == 0), (32, 128) for 8-bit ones (S_max % 32 == 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_ops.quant import KV_CACHE_DTYPES, SCALE_DTYPES, is_quantized

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
CACHE_ROW_MULTIPLE = 8         # the Pallas kernels need S_max % 8 == 0 (HBM row tiling) ...
QUANT_CACHE_ROW_MULTIPLE = 32  # ... and S_max % 32 == 0 for 8-bit caches ((32, 128) HBM tiles)
MAX_BLOCK_SIZE = 64


def _shape(name, x, ndim):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != ndim:
        raise ValueError(f"{name} must be a rank-{ndim} array, got shape {shape}")
    return tuple(shape)


def _dtype(x):
    return jnp.dtype(x.dtype)


def cache_row_multiple(dtype) -> int:
    """The Pallas kernels' S_max multiple for a cache of `dtype` (its HBM row tile)."""
    return QUANT_CACHE_ROW_MULTIPLE if is_quantized(dtype) else CACHE_ROW_MULTIPLE


def _check_capacity(S_max, row_multiple, dtype=None):
    """row_multiple: 1 (the XLA twins: any S_max) or the Pallas kernels' multiple for 16/32-bit
    caches; an 8-bit cache then needs QUANT_CACHE_ROW_MULTIPLE."""
    if row_multiple > 1 and dtype is not None and is_quantized(dtype):
        row_multiple = max(row_multiple, QUANT_CACHE_ROW_MULTIPLE)
        tiles = "(32, 128)-tiled HBM layout of 8-bit arrays"
    else:
        tiles = "(8, 128)-tiled HBM layout"
    if row_multiple > 1 and S_max % row_multiple:
        raise ValueError(f"k_cache capacity S_max={S_max} must be a multiple of {row_multiple}: "
                         f"the Pallas kernels DMA cache rows in {tiles}, where slices must be "
                         "whole row tiles")


def _check_cache_dtype(k_cache, v_cache, q_dtype):
    """k_cache's dtype: q's (bf16/f32) or an 8-bit quantized one; v_cache's the same."""
    dt = _dtype(k_cache)
    if dt.name not in KV_CACHE_DTYPES:
        if dt not in SUPPORTED_DTYPES:
            raise ValueError(f"k_cache dtype {dt} not supported; use q's dtype {q_dtype} or a "
                             f"quantized dtype, one of {KV_CACHE_DTYPES} (with scales)")
        if dt != q_dtype:
            raise ValueError(f"k_cache dtype {dt} must equal q dtype {q_dtype} (or be a "
                             f"quantized dtype, one of {KV_CACHE_DTYPES}, with scales)")
    if _dtype(v_cache) != dt:
        raise ValueError(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {dt}")
    return dt


def check_scales(cache_dtype, k_scales, v_scales, shape):
    """The scales of a cache of `cache_dtype` with [B, Hkv, S_max] = `shape`: required (f32 or
    bf16, both the same, of that shape) for a quantized cache, refused for a bf16/f32 one.
    Returns the scale dtype, or None for a plain cache."""
    if not is_quantized(cache_dtype):
        for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
            if x is not None:
                raise ValueError(f"{name} given for a {jnp.dtype(cache_dtype).name} cache: "
                                 f"scales belong to quantized caches ({', '.join(KV_CACHE_DTYPES)})"
                                 " only")
        return None
    for name, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if x is None:
            raise ValueError(f"{name} is required for a {jnp.dtype(cache_dtype).name} cache: "
                             "[B, Hkv, S_max] f32 or bf16 scales, one per (KV head, token)")
        if _shape(name, x, 3) != tuple(shape):
            raise ValueError(f"{name} shape {x.shape} must be [B, Hkv, S_max] = {list(shape)}")
        if _dtype(x).name not in SCALE_DTYPES:
            raise ValueError(f"{name} dtype {x.dtype} not supported; use one of {SCALE_DTYPES}")
    if _dtype(v_scales) != _dtype(k_scales):
        raise ValueError(f"v_scales dtype {v_scales.dtype} must equal k_scales dtype "
                         f"{k_scales.dtype}")
    return _dtype(k_scales)


def check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, k_scales=None,
                 v_scales=None, sliding_window=None, head_dims=SUPPORTED_HEAD_DIMS,
                 row_multiple=1):
    """Static checks of `block_attention`'s inputs; returns (B, bs, Hq, Hkv, S_max, D).

    row_multiple: 1 (any S_max) or the Pallas kernels' CACHE_ROW_MULTIPLE (8-bit caches then
    need QUANT_CACHE_ROW_MULTIPLE)."""
    B, bs, Hq, D = _shape("q", q, 4)
    Bk, bsk, Hkv, Dk = _shape("k_block", k_block, 4)
    if (Bk, bsk, Dk) != (B, bs, D):
        raise ValueError(f"k_block shape {k_block.shape} does not match q {q.shape} "
                         "(expected [B, bs, Hkv, D])")
    if tuple(v_block.shape) != tuple(k_block.shape):
        raise ValueError(f"v_block shape {v_block.shape} != k_block shape {k_block.shape}")
    _, _, S_max, _ = _shape("k_cache", k_cache, 4)
    if tuple(k_cache.shape) != (B, Hkv, S_max, D):
        raise ValueError(f"k_cache shape {k_cache.shape} must be [B, Hkv, S_max, D] = "
                         f"[{B}, {Hkv}, S_max, {D}]")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    if S_max < 1:
        raise ValueError(f"k_cache capacity S_max must be >= 1, got {S_max}")
    if _shape("ctx_lens", ctx_lens, 1) != (B,):
        raise ValueError(f"ctx_lens shape {ctx_lens.shape} must be [B] = [{B}]")
    if _dtype(ctx_lens) != jnp.dtype(jnp.int32):
        raise ValueError(f"ctx_lens must be int32, got {ctx_lens.dtype}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv}")
    if not 1 <= bs <= MAX_BLOCK_SIZE:
        raise ValueError(f"block size bs={bs} (q.shape[1]) must be in 1..{MAX_BLOCK_SIZE}")
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"head dim D={D} (q.shape[3]) not supported; supported: {head_dims}")
    dt = _dtype(q)
    if dt not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype {dt} not supported; use bfloat16 or float32")
    for name, x in (("k_block", k_block), ("v_block", v_block)):
        if _dtype(x) != dt:
            raise ValueError(f"{name} dtype {x.dtype} must equal q dtype {dt}")
    cache_dt = _check_cache_dtype(k_cache, v_cache, dt)
    check_scales(cache_dt, k_scales, v_scales, (B, Hkv, S_max))
    _check_capacity(S_max, row_multiple, cache_dt)
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)) \
                or sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    return B, bs, Hq, Hkv, S_max, D


def check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, k_scales=None,
                        v_scales=None, head_dims=None, row_multiple=1):
    """Static checks of `append_context`'s inputs; returns (B, Hkv, S_max, D, n_max).

    A bf16/f32 cache takes k_new/v_new of its own dtype; a quantized cache takes bf16/f32 ones
    (quantized on the way in) and its scales."""
    B, Hkv, S_max, D = _shape("k_cache", k_cache, 4)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    _, n_max, _, _ = _shape("k_new", k_new, 4)
    if tuple(k_new.shape) != (B, n_max, Hkv, D):
        raise ValueError(f"k_new shape {k_new.shape} must be [B, n_max, Hkv, D] = "
                         f"[{B}, n_max, {Hkv}, {D}]")
    if tuple(v_new.shape) != tuple(k_new.shape):
        raise ValueError(f"v_new shape {v_new.shape} != k_new shape {k_new.shape}")
    if n_max > S_max:
        raise ValueError(f"k_new holds n_max={n_max} rows, more than the cache capacity "
                         f"S_max={S_max}")
    for name, x in (("ctx_lens", ctx_lens), ("n_new", n_new)):
        if _shape(name, x, 1) != (B,):
            raise ValueError(f"{name} shape {x.shape} must be [B] = [{B}]")
        if _dtype(x) != jnp.dtype(jnp.int32):
            raise ValueError(f"{name} must be int32, got {x.dtype}")
    dt = _dtype(k_cache)
    if dt.name not in KV_CACHE_DTYPES and dt not in SUPPORTED_DTYPES:
        raise ValueError(f"k_cache dtype {dt} not supported; use bfloat16, float32 or a "
                         f"quantized dtype, one of {KV_CACHE_DTYPES}")
    if _dtype(v_cache) != dt:
        raise ValueError(f"v_cache dtype {v_cache.dtype} must equal k_cache dtype {dt}")
    if dt.name in KV_CACHE_DTYPES:   # new rows in bf16/f32, quantized on the way in
        new_dt = _dtype(k_new)
        if new_dt not in SUPPORTED_DTYPES:
            raise ValueError(f"k_new dtype {new_dt} not supported for a {dt} cache; use "
                             "bfloat16 or float32 (quantized on the way in)")
        if _dtype(v_new) != new_dt:
            raise ValueError(f"v_new dtype {v_new.dtype} must equal k_new dtype {new_dt}")
    else:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if _dtype(x) != dt:
                raise ValueError(f"{name} dtype {x.dtype} must equal k_cache dtype {dt}")
    check_scales(dt, k_scales, v_scales, (B, Hkv, S_max))
    _check_capacity(S_max, row_multiple, dt)
    if head_dims is not None and D not in head_dims:
        raise ValueError(f"head dim D={D} not supported; supported: {head_dims}")
    return B, Hkv, S_max, D, n_max


def is_host_value(x) -> bool:
    """True when `x` already lives on the host (so checking it costs no device sync)."""
    return isinstance(x, (np.ndarray, list, tuple, int, np.integer))


def _host(name, x):
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"validate=True needs concrete {name}, not a traced value (call it "
                         "outside jit, or use check_block_attention_inputs on the host)")
    return np.asarray(x)


def check_lengths(S_max, ctx_lens, n_new=None, *, n_max=None):
    """Dynamic checks: 0 <= ctx_len, ctx_len (+ n_new) <= S_max, 0 <= n_new <= n_max."""
    c = _host("ctx_lens", ctx_lens).astype(np.int64)
    if (c < 0).any():
        raise ValueError(f"ctx_lens must be >= 0, got {c.tolist()}")
    if n_new is None:
        if (c > S_max).any():
            raise ValueError(f"ctx_lens {c.tolist()} exceed the cache capacity S_max={S_max}")
        return
    n = _host("n_new", n_new).astype(np.int64)
    if (n < 0).any() or (n_max is not None and (n > n_max).any()):
        raise ValueError(f"n_new must be in 0..{n_max}, got {n.tolist()}")
    if (c + n > S_max).any():
        raise ValueError(f"ctx_lens + n_new = {(c + n).tolist()} exceed the cache capacity "
                         f"S_max={S_max}")


def check_block_attention_inputs(q, k_block, v_block, k_cache, v_cache, ctx_lens, *,
                                 k_scales=None, v_scales=None, sliding_window=None, n_new=None,
                                 head_dims=SUPPORTED_HEAD_DIMS, row_multiple=CACHE_ROW_MULTIPLE):
    """Host-side check of every static and dynamic fact `block_attention` relies on.

    With `n_new` ([B] int32) also checks that appending n_new rows at ctx_lens fits the cache.
    Raises ValueError on the first violation; returns None.
    """
    _, _, _, _, S_max, _ = check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens,
                                        k_scales=k_scales, v_scales=v_scales,
                                        sliding_window=sliding_window, head_dims=head_dims,
                                        row_multiple=row_multiple)
    check_lengths(S_max, ctx_lens)
    if n_new is not None:
        check_lengths(S_max, ctx_lens, n_new)
