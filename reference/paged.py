"""NumPy float64 reference of ragged paged causal attention and of the KV-page write.

Same contract (and argument names) as `pallas_ops.paged_attention`:

    paged_attention(q [T, Hq, D], k_pages [Hkv, P, page_size, D], v_pages, kv_lens [S],
                    page_indices [S, pages_per_seq], cu_q_lens [S + 1], num_seqs,
                    *, sm_scale=None, soft_cap=None, sliding_window=None) -> [T, Hq, D] float64

Query i of sequence s (q_len = cu_q_lens[s+1] - cu_q_lens[s]) sits at position
kv_len - q_len + i and sees keys at positions j with j <= that position and, with a sliding
window w, j > position - w. Head h of q reads KV head h // G (G = Hq // Hkv). Rows past
cu_q_lens[num_seqs] are zeros. Only the page-table entries a sequence needs are read.
Written as plain loops over sequences and heads, for clarity rather than speed.

`ragged_paged_attention` is the contract of `pallas_ops.ragged_paged_attention` (jax's signature
and interleaved layout kv_pages [P, page_size, 2 * Hkv, D], sm_scale default 1.0, k_scale /
v_scale), through the same loops.
"""
from __future__ import annotations

import numpy as np


def _num(num_seqs) -> int:
    return int(np.asarray(num_seqs).reshape(-1)[0])


def gather_sequence_kv(k_pages, v_pages, page_indices, seq, kv_len, k_scales=None,
                       v_scales=None):
    """The first kv_len keys/values of sequence `seq`: two float64 [Hkv, kv_len, D] arrays
    (8-bit pages: stored value * scale, scales [Hkv, P, page_size])."""
    page_size = k_pages.shape[2]
    n_pages = -(-kv_len // page_size)
    pages = [int(p) for p in np.asarray(page_indices)[seq, :n_pages]]

    def read(pages_arr, scales, p):
        x = np.asarray(pages_arr[:, p]).astype(np.float64)
        if scales is not None:
            x = x * np.asarray(scales[:, p]).astype(np.float64)[..., None]
        return x

    k = np.concatenate([read(k_pages, k_scales, p) for p in pages], axis=1)
    v = np.concatenate([read(v_pages, v_scales, p) for p in pages], axis=1)
    return k[:, :kv_len], v[:, :kv_len]


def paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                    sm_scale=None, soft_cap=None, sliding_window=None, k_scales=None,
                    v_scales=None, sinks=None):
    """k_scales / v_scales: 8-bit caches' scales [Hkv, P, page_size] (value = stored * scale).
    sinks: [Hq] logits that join each head's softmax denominator and attend to nothing."""
    q = np.asarray(q, np.float64)
    t_rows, hq, d = q.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    scale = 1.0 / np.sqrt(d) if sm_scale is None else float(sm_scale)
    kv_lens = np.asarray(kv_lens)
    cu = np.asarray(cu_q_lens)
    out = np.zeros((t_rows, hq, d), np.float64)
    for s in range(_num(num_seqs)):
        q_start, q_end = int(cu[s]), int(cu[s + 1])
        q_len, kv_len = q_end - q_start, int(kv_lens[s])
        if q_len == 0:
            continue
        k, v = gather_sequence_kv(k_pages, v_pages, page_indices, s, kv_len, k_scales, v_scales)
        q_pos = kv_len - q_len + np.arange(q_len)                       # [q_len]
        k_pos = np.arange(kv_len)                                       # [kv_len]
        mask = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
        for h in range(hq):
            kh, vh = k[h // g], v[h // g]
            for i in range(q_len):
                seen = mask[i]                                          # keys query i sees
                logits = kh[seen] @ q[q_start + i, h] * scale
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                if sinks is None:
                    p = np.exp(logits - logits.max())
                    out[q_start + i, h] = (p / p.sum()) @ vh[seen]
                    continue
                sink = float(np.asarray(sinks, np.float64)[h])
                top = max(logits.max(initial=-np.inf), sink)
                p = np.exp(logits - top)
                out[q_start + i, h] = (p @ vh[seen]) / (p.sum() + np.exp(sink - top))
    return out


def split_interleaved(kv_pages):
    """jax's layout kv_pages [P, page_size, 2 * Hkv, D] (K of head h at 2h, V at 2h + 1) as two
    [Hkv, P, page_size, D] arrays (copies; the kernel reads the interleaved array in place)."""
    kv = np.asarray(kv_pages)
    return np.transpose(kv[:, :, 0::2], (2, 0, 1, 3)), np.transpose(kv[:, :, 1::2], (2, 0, 1, 3))


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale=1.0, sliding_window=None, soft_cap=None, mask_value=None,
                           k_scale=None, v_scale=None):
    """`pallas_ops.ragged_paged_attention`'s contract (jax's signature and layout) in float64:
    `paged_attention` on the de-interleaved cache, keys scaled by k_scale and values by v_scale.
    Masked keys get weight 0 (`mask_value` is only accepted: jax's default underflows to 0)."""
    del mask_value
    k_pages, v_pages = split_interleaved(kv_pages)
    k_pages = np.asarray(k_pages, np.float64) * (1.0 if k_scale is None else k_scale)
    v_pages = np.asarray(v_pages, np.float64) * (1.0 if v_scale is None else v_scale)
    return paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                           sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)


def write_kv_pages(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs,
                   k_scales=None, v_scales=None):
    """Returns copies of (k_pages, v_pages) with token i of sequence s written at position
    kv_lens[s] - q_len_s + i (page page_indices[s, pos // page_size], row pos % page_size).
    8-bit pages (k_scales / v_scales given): the new rows are quantized per (head, token) with
    `reference.quant.quantize`; returns (k_pages, v_pages, k_scales, v_scales)."""
    k_out, v_out = np.array(k_pages), np.array(v_pages)
    k_new, v_new = np.asarray(k_new), np.asarray(v_new)
    quantized = k_scales is not None
    if quantized:
        from reference import quant
        dtype = np.dtype(k_out.dtype).name
        sdt = np.dtype(np.asarray(k_scales).dtype).name
        ks_out, vs_out = np.array(k_scales), np.array(v_scales)
        k_new, k_sc = quant.quantize(np.asarray(k_new, np.float32), dtype, scale_dtype=sdt)
        v_new, v_sc = quant.quantize(np.asarray(v_new, np.float32), dtype, scale_dtype=sdt)
    page_size = k_out.shape[2]
    kv_lens, cu, table = np.asarray(kv_lens), np.asarray(cu_q_lens), np.asarray(page_indices)
    for s in range(_num(num_seqs)):
        q_start, q_end = int(cu[s]), int(cu[s + 1])
        for i, row in enumerate(range(q_start, q_end)):
            pos = int(kv_lens[s]) - (q_end - q_start) + i
            page = int(table[s, pos // page_size])
            k_out[:, page, pos % page_size] = k_new[row]
            v_out[:, page, pos % page_size] = v_new[row]
            if quantized:
                ks_out[:, page, pos % page_size] = k_sc[row]
                vs_out[:, page, pos % page_size] = v_sc[row]
    if quantized:
        return k_out, v_out, ks_out, vs_out
    return k_out, v_out
