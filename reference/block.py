"""NumPy float64 reference of `block_attention` and `append_context` (same contract as
`pallas_ops.block_attention`).

Block query i of sequence b sits at absolute position ctx_lens[b] + i. It attends, with no causal
mask, to context keys j in 0..ctx_lens[b]-1 and to all bs block keys. With `sliding_window=W`,
context key j is visible only if j > ctx_lens[b] + i - W; the block keys stay visible.
Cache rows at or past ctx_lens[b] are never read.

Quantized caches (int8 / float8_e4m3fn / float8_e5m2 values with [B, Hkv, S_max] scales, see
`reference.quant`): pass `k_scales=` / `v_scales=`; the context is then `values * scales`.
"""
from __future__ import annotations

import math

import numpy as np

from reference import quant


def _context(cache, scales):
    """The context a cache holds, float64: the values, or values * scales when quantized."""
    if scales is None:
        return np.asarray(cache, np.float64)
    return quant.dequantize(cache, scales)


def block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, k_scales=None,
                    v_scales=None, sm_scale=None, sliding_window=None):
    """q [B, bs, Hq, D]; k_block/v_block [B, bs, Hkv, D]; k_cache/v_cache [B, Hkv, S_max, D]
    (with k_scales/v_scales [B, Hkv, S_max] when quantized); ctx_lens [B].
    Returns float64 [B, bs, Hq, D]."""
    q = np.asarray(q, np.float64)
    k_block = np.asarray(k_block, np.float64)
    v_block = np.asarray(v_block, np.float64)
    k_cache = _context(k_cache, k_scales)
    v_cache = _context(v_cache, v_scales)
    B, bs, Hq, D = q.shape
    Hkv = k_block.shape[2]
    if Hq % Hkv:
        raise ValueError(f"Hq={Hq} not a multiple of Hkv={Hkv}")
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    out = np.zeros((B, bs, Hq, D), np.float64)
    for b in range(B):
        n = int(ctx_lens[b])
        if not 0 <= n <= k_cache.shape[2]:
            raise ValueError(f"ctx_lens[{b}]={n} outside 0..S_max")
        for h in range(Hq):
            kvh = h // G
            keys = np.concatenate([k_cache[b, kvh, :n], k_block[b, :, kvh]], axis=0)
            vals = np.concatenate([v_cache[b, kvh, :n], v_block[b, :, kvh]], axis=0)
            for i in range(bs):
                visible = np.ones(n + bs, bool)
                if sliding_window is not None:
                    visible[:n] = np.arange(n) > n + i - sliding_window
                s = keys[visible] @ q[b, i, h] * scale
                p = np.exp(s - s.max())
                out[b, i, h] = (p / p.sum()) @ vals[visible]
    return out


def append_context(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, k_scales=None,
                   v_scales=None):
    """Copies of the caches with k_new[b, :n_new[b]] (and v_new) written at rows ctx_lens[b]..
    k_cache/v_cache [B, Hkv, S_max, D]; k_new/v_new [B, n_max, Hkv, D].

    Quantized caches (k_scales/v_scales [B, Hkv, S_max] given): the new rows are quantized with
    `reference.quant.quantize` to the cache's dtype and the scales' dtype, values and scales
    written; returns (k_cache, v_cache, k_scales, v_scales)."""
    caches = [np.array(k_cache, copy=True), np.array(v_cache, copy=True)]
    news = [np.asarray(k_new), np.asarray(v_new)]
    scales = None
    if k_scales is not None or v_scales is not None:
        scales = [np.array(k_scales, copy=True), np.array(v_scales, copy=True)]
        for x in range(2):
            news[x] = quant.quantize(news[x], caches[x].dtype.name,
                                     scale_dtype=scales[x].dtype.name)
    for b in range(caches[0].shape[0]):
        c, n = int(ctx_lens[b]), int(n_new[b])
        if c < 0 or n < 0 or n > k_new.shape[1] or c + n > caches[0].shape[2]:
            raise ValueError(f"sequence {b}: ctx_len={c}, n_new={n} do not fit")
        for x in range(2):
            if scales is None:
                caches[x][b, :, c:c + n] = np.swapaxes(news[x][b, :n], 0, 1)
            else:
                values, s = news[x]
                caches[x][b, :, c:c + n] = np.swapaxes(values[b, :n], 0, 1)
                scales[x][b, :, c:c + n] = s[b, :n].T
    if scales is None:
        return caches[0], caches[1]
    return caches[0], caches[1], scales[0], scales[1]
