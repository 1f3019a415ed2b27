"""Plain-jnp `block_attention` and `append_context`: the same contract as the Pallas kernels.

This is the model layer's fast CPU backend (and a readable statement of the semantics). It is
jittable with fixed shapes. Unlike the Pallas kernel it touches the whole static cache (masked),
so its cost grows with S_max; the Pallas kernel's grows with ctx_len.

Semantics (shared with `pallas_ops.block_attention` and `reference.block`): block query
i of sequence b sits at absolute position ctx_lens[b] + i and attends, without a causal mask, to
context keys 0..ctx_lens[b]-1 and to all bs block keys. With `sliding_window=W`, context key j is
visible to block query i only if j > ctx_lens[b] + i - W; block keys are always visible.
Cache rows (and scales) at or past ctx_lens[b] may hold anything (NaN included): they never
reach the result. A quantized cache (int8 / float8_e4m3fn / float8_e5m2 with [B, Hkv, S_max]
scales, `pallas_ops.quant`) is dequantized (values * scales, f32) and attended to.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_ops import quant
from pallas_ops.block.validation import (
    check_append_static,
    check_lengths,
    check_static,
    is_host_value,
)


def block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, k_scales=None,
                    v_scales=None, sm_scale=None, sliding_window=None, validate=False):
    """Non-causal block attention over a static context cache, in plain jnp.

    Args:
      q:        [B, bs, Hq, D] bf16/f32, block queries (RoPE applied by the caller).
      k_block:  [B, bs, Hkv, D] same dtype, the block's own keys.
      v_block:  [B, bs, Hkv, D] same dtype, the block's own values.
      k_cache:  [B, Hkv, S_max, D] same dtype, or int8 / float8_e4m3fn / float8_e5m2 (quantized),
        static context keys.
      v_cache:  [B, Hkv, S_max, D] k_cache's dtype, static context values.
      ctx_lens: [B] int32, valid context entries per sequence (0..S_max).
      k_scales, v_scales: [B, Hkv, S_max] f32/bf16 (both the same), required for a quantized
        cache, None otherwise: context key j of head h is k_cache[b, h, j] * k_scales[b, h, j].
      sm_scale: softmax scale, default 1/sqrt(D).
      sliding_window: None, or W >= 1 (see module docstring).
      validate: check ctx_lens on the host (needs concrete values).
    Returns:
      [B, bs, Hq, D] in q's dtype; softmax and accumulation in f32.
    Any head dim is accepted here (the Pallas kernel supports 64/128/256).
    """
    B, bs, Hq, Hkv, S_max, D = check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens,
                                            k_scales=k_scales, v_scales=v_scales,
                                            sliding_window=sliding_window, head_dims=None)
    if validate or is_host_value(ctx_lens):
        check_lengths(S_max, ctx_lens)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    return _block_attention(q, k_block, v_block, k_cache, v_cache, jnp.asarray(ctx_lens),
                            k_scales, v_scales, scale=scale, window=sliding_window)


def _attend(q, k_block, v_block, k_cache, v_cache, ctx_lens, scale, window):
    """k_cache / v_cache: the context itself (any float dtype; f32 when dequantized)."""
    B, bs, Hq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    f32 = jnp.float32
    qf = q.astype(f32).reshape(B, bs, Hkv, G, D)
    j = jnp.arange(S_max, dtype=jnp.int32)
    valid = j[None, :] < ctx_lens[:, None]                                   # [B, S]
    kc = jnp.where(valid[:, None, :, None], k_cache.astype(f32), 0.0)        # NaN-safe
    vc = jnp.where(valid[:, None, :, None], v_cache.astype(f32), 0.0)
    hi = jax.lax.Precision.HIGHEST
    s_ctx = jnp.einsum("bihgd,bhjd->bhgij", qf, kc, precision=hi) * scale     # [B,Hkv,G,bs,S]
    s_blk = jnp.einsum("bihgd,bjhd->bhgij", qf, k_block.astype(f32), precision=hi) * scale
    i = jnp.arange(bs, dtype=jnp.int32)
    vis = valid[:, None, :]                                                   # [B, 1, S]
    if window is not None:
        lo = ctx_lens[:, None, None] + i[None, :, None] - window              # [B, bs, 1]
        vis = vis & (j[None, None, :] > lo)                                   # [B, bs, S]
    s_ctx = jnp.where(vis[:, None, None], s_ctx, -jnp.inf)
    m = jnp.maximum(jnp.max(s_ctx, axis=-1), jnp.max(s_blk, axis=-1))[..., None]
    p_ctx = jnp.exp(s_ctx - m)
    p_blk = jnp.exp(s_blk - m)
    l = jnp.sum(p_ctx, axis=-1) + jnp.sum(p_blk, axis=-1)                     # [B,Hkv,G,bs]
    o = (jnp.einsum("bhgij,bhjd->bhgid", p_ctx, vc, precision=hi)
         + jnp.einsum("bhgij,bjhd->bhgid", p_blk, v_block.astype(f32), precision=hi))
    o = o / l[..., None]
    return o.transpose(0, 3, 1, 2, 4).reshape(B, bs, Hq, D).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "window"))
def _block_attention(q, kb, vb, kc, vc, cl, ks, vs, *, scale, window):
    if ks is not None:   # quantized: the context is values * scales (NaN past ctx_len masked)
        kc, vc = quant.dequantize(kc, ks), quant.dequantize(vc, vs)
    return _attend(q, kb, vb, kc, vc, cl, scale, window)


def append_context(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, k_scales=None,
                   v_scales=None, validate=False):
    """Write the first n_new[b] rows of k_new/v_new at rows ctx_lens[b].. of the caches.

    Args:
      k_cache, v_cache: [B, Hkv, S_max, D] bf16/f32, or int8 / float8_e4m3fn / float8_e5m2
        (quantized), static context caches (donate them under jit to update in place).
      k_new, v_new: [B, n_max, Hkv, D] new context keys/values: the caches' dtype, or bf16/f32
        (both the same) for a quantized cache; then quantized with `pallas_ops.quant.quantize`
        (per token and KV head, over D) to the cache's dtype and the scales' dtype.
      ctx_lens: [B] int32, rows already valid (the write offset).
      n_new: [B] int32 in 0..n_max, rows to append; ctx_lens + n_new <= S_max is the caller's
        responsibility (checked on the host when checkable, or with validate=True).
      k_scales, v_scales: [B, Hkv, S_max] f32/bf16, required for (only for) a quantized cache.
    Returns:
      (k_cache, v_cache) updated, or (k_cache, v_cache, k_scales, v_scales) for a quantized
      cache; every other row (and scale) unchanged. Lengths are not updated.
    """
    _, _, S_max, _, n_max = check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new,
                                                k_scales=k_scales, v_scales=v_scales)
    if validate or (is_host_value(ctx_lens) and is_host_value(n_new)):
        check_lengths(S_max, ctx_lens, n_new, n_max=n_max)
    args = (k_cache, v_cache, k_new, v_new, jnp.asarray(ctx_lens), jnp.asarray(n_new))
    if k_scales is None:
        return _append(*args)
    return _append_quantized(*args, k_scales, v_scales)


def append_rows(cache, new, ctx_lens, n_new):
    """cache [B, Hkv, S_max, D] with new[b, t] ([B, n_max, Hkv, D]) written at row
    ctx_lens[b] + t for t < n_new[b] (an XLA scatter; every other element unchanged)."""
    B, Hkv, S_max, _ = cache.shape
    n_max = new.shape[1]
    t = jnp.arange(n_max, dtype=jnp.int32)
    pos = jnp.where(t[None, :] < n_new[:, None], ctx_lens[:, None] + t[None, :], S_max)
    b = jnp.arange(B)[:, None, None]
    h = jnp.arange(Hkv)[None, None, :]
    idx = (b, h, pos[:, :, None])                      # each broadcasts to [B, n_max, Hkv]
    return cache.at[idx].set(new, mode="drop")


def append_scales(scales, new, ctx_lens, n_new):
    """scales [B, Hkv, S_max] with new[b, t] ([B, n_max, Hkv]) written at ctx_lens[b] + t for
    t < n_new[b]; every other element unchanged (bit for bit). Also the Pallas
    `append_context`'s writer of the scales (they cannot be DMA'd in pieces under 512 bytes).

    One dynamic_update_slice of an n_max-token window per sequence (old values kept outside the
    new rows), in place on a donated array. Not a scatter: XLA's TPU scatter stages the whole
    [B, Hkv, S_max] operand through VMEM (read and written in full on every call). On the raw
    bits: XLA:CPU (jax 0.10) computes bf16 selects in f32, which rewrites NaN payloads."""
    B, Hkv, S_max = scales.shape
    n_max = new.shape[1]
    r = jnp.arange(n_max, dtype=jnp.int32)
    dtype = scales.dtype
    bits = {2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(dtype).itemsize]
    scales = jax.lax.bitcast_convert_type(scales, bits)
    new = jax.lax.bitcast_convert_type(new.astype(dtype), bits)

    def one(b, out):
        c = ctx_lens[b]
        start = jnp.clip(c, 0, S_max - n_max)        # the window [start, start + n_max) fits
        t = start + r - c                              # new row written at window slot r
        ok = (t >= 0) & (t < n_new[b])
        old = jax.lax.dynamic_slice(out, (b, 0, start), (1, Hkv, n_max))
        rows = jnp.take(new[b], jnp.clip(t, 0, n_max - 1), axis=0).T   # [Hkv, n_max]
        merged = jnp.where(ok[None, None, :], rows[None], old)
        return jax.lax.dynamic_update_slice(out, merged, (b, 0, start))

    return jax.lax.bitcast_convert_type(jax.lax.fori_loop(0, B, one, scales), dtype)


@jax.jit
def _append(k_cache, v_cache, k_new, v_new, ctx_lens, n_new):
    return append_rows(k_cache, k_new, ctx_lens, n_new), append_rows(v_cache, v_new, ctx_lens,
                                                                     n_new)


@jax.jit
def _append_quantized(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, k_scales, v_scales):
    # The values are scattered as raw bytes (int8), like the Pallas kernel moves them: a scatter
    # of fp8 elements would canonicalise every NaN of the cache (0x7E -> 0x7F in e5m2).
    as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.int8)  # noqa: E731
    out = []
    for cache, new, scales in ((k_cache, k_new, k_scales), (v_cache, v_new, v_scales)):
        values, new_scales = quant.quantize(new, cache.dtype, scale_dtype=scales.dtype)
        written = append_rows(as_bytes(cache), as_bytes(values), ctx_lens, n_new)
        out.append((jax.lax.bitcast_convert_type(written, cache.dtype),
                    append_scales(scales, new_scales, ctx_lens, n_new)))
    (kc, ks), (vc, vs) = out
    return kc, vc, ks, vs
