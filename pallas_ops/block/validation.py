"""Input validation shared by `block_attention` / `append_context` (Pallas and XLA versions).

Static facts (ranks, shapes, dtypes, divisibility, head dims, block size range) raise `ValueError`
naming the argument before any kernel runs. Dynamic facts (lengths within the cache capacity) are
checked on the host when the lengths are host values (NumPy arrays, lists), or on request
(`validate=True` / `check_block_attention_inputs`), which fetches device arrays to the host.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))
CACHE_ROW_MULTIPLE = 8   # the Pallas kernels need S_max % 8 == 0 (HBM row tiling)
MAX_BLOCK_SIZE = 64


def _shape(name, x, ndim):
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != ndim:
        raise ValueError(f"{name} must be a rank-{ndim} array, got shape {shape}")
    return tuple(shape)


def _dtype(x):
    return jnp.dtype(x.dtype)


def _check_capacity(S_max, row_multiple):
    if row_multiple > 1 and S_max % row_multiple:
        raise ValueError(f"k_cache capacity S_max={S_max} must be a multiple of {row_multiple}: "
                         "the Pallas kernels DMA cache rows in (8, 128)-tiled HBM layout, where "
                         "slices must be whole row tiles")


def check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, sliding_window=None,
                 head_dims=SUPPORTED_HEAD_DIMS, row_multiple=1):
    """Static checks of `block_attention`'s inputs; returns (B, bs, Hq, Hkv, S_max, D)."""
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
    _check_capacity(S_max, row_multiple)
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
    for name, x in (("k_block", k_block), ("v_block", v_block), ("k_cache", k_cache),
                    ("v_cache", v_cache)):
        if _dtype(x) != dt:
            raise ValueError(f"{name} dtype {x.dtype} must equal q dtype {dt}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)) \
                or sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    return B, bs, Hq, Hkv, S_max, D


def check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, head_dims=None,
                        row_multiple=1):
    """Static checks of `append_context`'s inputs; returns (B, Hkv, S_max, D, n_max)."""
    B, Hkv, S_max, D = _shape("k_cache", k_cache, 4)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {v_cache.shape} != k_cache shape {k_cache.shape}")
    _check_capacity(S_max, row_multiple)
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
    if dt not in SUPPORTED_DTYPES:
        raise ValueError(f"k_cache dtype {dt} not supported; use bfloat16 or float32")
    for name, x in (("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new)):
        if _dtype(x) != dt:
            raise ValueError(f"{name} dtype {x.dtype} must equal k_cache dtype {dt}")
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
                                 sliding_window=None, n_new=None, head_dims=SUPPORTED_HEAD_DIMS,
                                 row_multiple=CACHE_ROW_MULTIPLE):
    """Host-side check of every static and dynamic fact `block_attention` relies on.

    With `n_new` ([B] int32) also checks that appending n_new rows at ctx_lens fits the cache.
    Raises ValueError on the first violation; returns None.
    """
    _, _, _, _, S_max, _ = check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens,
                                        sliding_window=sliding_window, head_dims=head_dims,
                                        row_multiple=row_multiple)
    check_lengths(S_max, ctx_lens)
    if n_new is not None:
        check_lengths(S_max, ctx_lens, n_new)
