"""Plain-jnp `block_attention` and `append_context`: the same contract as the Pallas kernels.

This is the model layer's fast CPU backend (and a readable statement of the semantics). It is
jittable with fixed shapes. Unlike the Pallas kernel it touches the whole static cache (masked),
so its cost grows with S_max; the Pallas kernel's grows with ctx_len.

Semantics (shared with `pallas_ops.block_attention` and `reference.block`): block query
i of sequence b sits at absolute position ctx_lens[b] + i and attends, without a causal mask, to
context keys 0..ctx_lens[b]-1 and to all bs block keys. With `sliding_window=W`, context key j is
visible to block query i only if j > ctx_lens[b] + i - W; block keys are always visible.
Cache rows at or past ctx_lens[b] may hold anything (NaN included): they never reach the result.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_ops.block.validation import (
    check_append_static,
    check_lengths,
    check_static,
    is_host_value,
)


def block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, sm_scale=None,
                    sliding_window=None, validate=False):
    """Non-causal block attention over a static context cache, in plain jnp.

    Args:
      q:        [B, bs, Hq, D] bf16/f32, block queries (RoPE applied by the caller).
      k_block:  [B, bs, Hkv, D] same dtype, the block's own keys.
      v_block:  [B, bs, Hkv, D] same dtype, the block's own values.
      k_cache:  [B, Hkv, S_max, D] same dtype, static context keys.
      v_cache:  [B, Hkv, S_max, D] same dtype, static context values.
      ctx_lens: [B] int32, valid context entries per sequence (0..S_max).
      sm_scale: softmax scale, default 1/sqrt(D).
      sliding_window: None, or W >= 1 (see module docstring).
      validate: check ctx_lens on the host (needs concrete values).
    Returns:
      [B, bs, Hq, D] in q's dtype; softmax and accumulation in f32.
    Any head dim is accepted here (the Pallas kernel supports 64/128/256).
    """
    B, bs, Hq, Hkv, S_max, D = check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens,
                                            sliding_window=sliding_window, head_dims=None)
    if validate or is_host_value(ctx_lens):
        check_lengths(S_max, ctx_lens)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    return _block_attention(q, k_block, v_block, k_cache, v_cache, jnp.asarray(ctx_lens),
                            scale=scale, window=sliding_window)


def _attend(q, k_block, v_block, k_cache, v_cache, ctx_lens, scale, window):
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


_block_attention = jax.jit(
    lambda q, kb, vb, kc, vc, cl, *, scale, window: _attend(q, kb, vb, kc, vc, cl, scale, window),
    static_argnames=("scale", "window"))


def append_context(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, validate=False):
    """Write the first n_new[b] rows of k_new/v_new at rows ctx_lens[b].. of the caches.

    Args:
      k_cache, v_cache: [B, Hkv, S_max, D] bf16/f32 static context caches (donate them under jit
        to update in place).
      k_new, v_new: [B, n_max, Hkv, D] same dtype, new context keys/values.
      ctx_lens: [B] int32, rows already valid (the write offset).
      n_new: [B] int32 in 0..n_max, rows to append; ctx_lens + n_new <= S_max is the caller's
        responsibility (checked on the host when checkable, or with validate=True).
    Returns:
      (k_cache, v_cache) updated; every other row unchanged. Lengths are not updated.
    """
    _, _, S_max, _, n_max = check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new)
    if validate or (is_host_value(ctx_lens) and is_host_value(n_new)):
        check_lengths(S_max, ctx_lens, n_new, n_max=n_max)
    return _append(k_cache, v_cache, k_new, v_new, jnp.asarray(ctx_lens), jnp.asarray(n_new))


@jax.jit
def _append(k_cache, v_cache, k_new, v_new, ctx_lens, n_new):
    B, Hkv, S_max, _ = k_cache.shape
    n_max = k_new.shape[1]
    t = jnp.arange(n_max, dtype=jnp.int32)
    pos = jnp.where(t[None, :] < n_new[:, None], ctx_lens[:, None] + t[None, :], S_max)
    b = jnp.arange(B)[:, None, None]
    h = jnp.arange(Hkv)[None, None, :]
    idx = (b, h, pos[:, :, None])                      # each broadcasts to [B, n_max, Hkv]
    k_cache = k_cache.at[idx].set(k_new, mode="drop")
    v_cache = v_cache.at[idx].set(v_new, mode="drop")
    return k_cache, v_cache
