"""Plain-jnp (XLA) `paged_attention` and `write_kv_pages`: the same contract as the Pallas kernels.

The model layer's fast backend off TPU (and a second, independent implementation to test
against). Jittable with fixed shapes; every static option is keyword-only. The q rows are cut into
chunks of up to R consecutive rows of ONE sequence (R from the static shapes: 1 for decode, the
rows per sequence for a uniform verify batch, at most `rows_per_chunk`); each chunk gathers its
sequence's pages once (a loop over the chunks in use, a few chunks per iteration, so memory stays
at about `rows_per_chunk * Hq * pages_per_seq * page_size` scores), masks causally (aligned to
the end) and by the sliding window, and takes an f32 softmax. Masked keys/values never reach the
output, even when they hold NaN: unused page-table slots are replaced by page 0 before the gather
and masked values are zeroed before p.V.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_ops.quant import dequantize, is_quantized, quantize
from pallas_ops.paged.validation import (
    check_paged_attention_inputs,
    check_static_attention,
    check_static_write,
)

__all__ = ["paged_attention", "write_kv_pages", "paged_attention_xla", "write_kv_pages_xla",
           "row_sequence_info"]


def _as_num_seqs(num_seqs):
    if isinstance(num_seqs, int):
        num_seqs = jnp.int32(num_seqs)
    return num_seqs


def row_sequence_info(cu_q_lens, kv_lens, num_seqs, num_tokens):
    """Per q row t: (sequence index, absolute position, valid). Rows past cu_q_lens[num_seqs] are
    invalid (their sequence index is clamped into range and their position is meaningless)."""
    n = jnp.reshape(num_seqs, (-1,))[0]
    s = kv_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    in_use = jnp.arange(s, dtype=jnp.int32) < n                                  # [S]
    ends = cu_q_lens[1:]                                                         # [S]
    seq = jnp.sum((ends[None, :] <= t[:, None]) & in_use[None, :], axis=1).astype(jnp.int32)
    seq = jnp.minimum(seq, s - 1)
    valid = t < cu_q_lens[n]
    pos = kv_lens[seq] - cu_q_lens[seq + 1] + t
    return seq, pos, valid


def _attend(q_rows, k_pages, v_pages, pages, p_rows, ok, *, scale, soft_cap, sliding_window,
            k_scales=None, v_scales=None, sinks=None):
    """R q rows [R, Hq, D] of one sequence, at positions p_rows [R] (rows with ok [R] False give
    zeros), over that sequence's pages [pps]: gathers them once (8-bit pages: dequantized with
    their scales). sinks: None or f32 [Hq] logits in the denominator. Returns [R, Hq, D] in q's
    dtype."""
    r, hq, d = q_rows.shape
    hkv = k_pages.shape[0]
    g = hq // hkv
    length = pages.shape[0] * k_pages.shape[2]
    key_pos = jnp.arange(length, dtype=jnp.int32)

    def gather(pages_arr, scales):
        x = pages_arr[:, pages]
        x = x.astype(jnp.float32) if scales is None else dequantize(x, scales[:, pages])
        return x.reshape(hkv, length, d)

    k, v = gather(k_pages, k_scales), gather(v_pages, v_scales)
    mask = (key_pos[None, :] <= p_rows[:, None]) & ok[:, None]                 # [R, L]
    if sliding_window is not None:
        mask = mask & (key_pos[None, :] > p_rows[:, None] - sliding_window)
    qf = q_rows.astype(jnp.float32).reshape(r, hkv, g, d)
    logits = jnp.einsum("rhgd,hld->hgrl", qf, k, precision=jax.lax.Precision.HIGHEST) * scale
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(mask, logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    if sinks is not None:
        sink = jnp.asarray(sinks, jnp.float32).reshape(hkv, g, 1, 1)
        m = jnp.maximum(m, sink)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(mask, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    if sinks is not None:
        denom = denom + jnp.exp(sink - m)
    v = jnp.where(jnp.any(mask, axis=0)[None, :, None], v, 0.0)     # NaN never meets a zero p
    out = jnp.einsum("hgrl,hld->hgrd", p, v, precision=jax.lax.Precision.HIGHEST)
    out = out / jnp.where(denom > 0, denom, 1.0)
    return jnp.transpose(out, (2, 0, 1, 3)).reshape(r, hq, d).astype(q_rows.dtype)


def paged_attention_xla(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                        sm_scale=None, soft_cap=None, sliding_window=None, k_scales=None,
                        v_scales=None, sinks=None, validate=False, rows_per_chunk=16):
    """Ragged paged causal attention in plain jnp.

    Args:
      q: [T, Hq, D] bf16/f32, the new tokens of all sequences concatenated in sequence order.
      k_pages, v_pages: [Hkv, P, page_size, D] bf16/f32 (same dtype), or 8-bit (int8,
        float8_e4m3fn, float8_e5m2) with k_scales / v_scales [Hkv, P, page_size] f32/bf16.
      kv_lens: int32 [S], keys per sequence counting its new tokens.
      page_indices: int32 [S, pages_per_seq], the page table.
      cu_q_lens: int32 [S + 1], sequence s owns q rows cu_q_lens[s]:cu_q_lens[s + 1].
      num_seqs: int32 scalar or [1], sequences in use.
      sm_scale: softmax scale (default 1/sqrt(D)); soft_cap: logits -> c * tanh(logits / c);
      sliding_window: a query at position p sees keys at positions > p - sliding_window.
      sinks: None or [Hq] f32, a logit per q head that joins the softmax denominator.
      validate: check the dynamic facts on the host first (needs concrete arrays).
      rows_per_chunk: most q rows of one sequence per gather of its pages (speed / memory
        trade-off only; the chunk size is min(rows_per_chunk, T // S), at least 1).
    Returns: [T, Hq, D] in q's dtype; rows past cu_q_lens[num_seqs] are zeros.
    """
    num_seqs = _as_num_seqs(num_seqs)
    geo = check_static_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                 sm_scale=sm_scale, soft_cap=soft_cap,
                                 sliding_window=sliding_window, k_scales=k_scales,
                                 v_scales=v_scales, sinks=sinks)
    if validate:
        check_paged_attention_inputs(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(geo.head_dim) if sm_scale is None else float(sm_scale)
    q, k_pages, v_pages = jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages)
    k_scales, v_scales, sinks = (None if x is None else jnp.asarray(x)
                                 for x in (k_scales, v_scales, sinks))
    t_rows, hq, d = q.shape
    ps, pps = geo.page_size, geo.pages_per_seq
    opts = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                k_scales=k_scales, v_scales=v_scales, sinks=sinks)

    # Page table with every slot a sequence does not need replaced by page 0 (never out of range).
    n = jnp.reshape(num_seqs, (-1,))[0]
    slot = jnp.arange(pps, dtype=jnp.int32)
    needed = (slot[None, :] * ps < kv_lens[:, None]) & (
        jnp.arange(geo.max_seqs, dtype=jnp.int32)[:, None] < n)
    table = jnp.where(needed, page_indices, 0)
    table = jnp.clip(table, 0, geo.total_pages - 1)

    # Chunks of R rows that never straddle two sequences: sequence s (in use) owns
    # ceil(q_len_s / R) chunks, numbered in sequence order; at most ceil(T / R) + S in all.
    max_seqs = geo.max_seqs
    r = max(1, min(rows_per_chunk, t_rows // max_seqs))
    per_iter = max(1, rows_per_chunk // r)               # chunks vectorized per loop iteration
    n_chunks = -(-(-(-t_rows // r) + max_seqs) // per_iter) * per_iter
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    in_use = jnp.arange(max_seqs, dtype=jnp.int32) < n
    per_seq = jnp.where(in_use, (q_lens + r - 1) // r, 0)                       # [S]
    chunk_end = jnp.cumsum(per_seq)                                             # [S]
    c = jnp.arange(n_chunks, dtype=jnp.int32)
    chunk_seq = jnp.minimum(jnp.sum(chunk_end[None, :] <= c[:, None], axis=1),
                            max_seqs - 1).astype(jnp.int32)                     # [C]
    first_row = cu_q_lens[chunk_seq] + (c - (chunk_end - per_seq)[chunk_seq]) * r  # [C]
    rows = first_row[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]         # [C, R]
    row_ok = (c < chunk_end[-1])[:, None] & (rows < cu_q_lens[chunk_seq + 1][:, None])
    row_pos = kv_lens[chunk_seq][:, None] - cu_q_lens[chunk_seq + 1][:, None] + rows
    dest = jnp.where(row_ok, rows, t_rows)               # rows of empty chunks: dropped

    def one_chunk(args):
        q_rows, s_i, p_rows, ok = args                   # [R, Hq, D], (), [R], [R]
        return _attend(q_rows, k_pages, v_pages, table[s_i], p_rows, ok, **opts)

    def body(i, out):      # chunks [i * per_iter, (i + 1) * per_iter): one gather per chunk
        ids = i * per_iter + jnp.arange(per_iter, dtype=jnp.int32)
        o = jax.vmap(one_chunk)((q[jnp.clip(rows[ids], 0, t_rows - 1)], chunk_seq[ids],
                                 row_pos[ids], row_ok[ids]))                    # [n, R, Hq, D]
        return out.at[dest[ids].reshape(-1)].set(o.reshape(-1, hq, d), mode="drop")

    # only the chunks in use are computed (a dynamic trip count: decode, verify and prefill
    # batches of the same static shape cost what their rows need)
    return jax.lax.fori_loop(0, (chunk_end[-1] + per_iter - 1) // per_iter, body,
                             jnp.zeros_like(q))


def token_slots(kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens, *, page_size,
                total_pages):
    """(page, row) int32 [T] of every new token; rows past cu_q_lens[num_seqs] get page
    `total_pages` (out of range: a scatter with mode="drop" skips them)."""
    seq, pos, valid = row_sequence_info(cu_q_lens, kv_lens, num_seqs, num_tokens)
    slot = jnp.clip(pos // page_size, 0, page_indices.shape[1] - 1)
    page = jnp.where(valid, page_indices[seq, slot], total_pages)
    row = jnp.where(valid, pos % page_size, 0)
    return page, row


def write_kv_pages_xla(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                       num_seqs, *, k_scales=None, v_scales=None, validate=False):
    """Writes the new tokens' keys/values into their pages (plain jnp scatter).

    Args:
      k_pages, v_pages: [Hkv, P, page_size, D]; k_new, v_new: [T, Hkv, D] (same dtype).
      kv_lens, page_indices, cu_q_lens, num_seqs: as in `paged_attention_xla`.
      k_scales, v_scales: [Hkv, P, page_size], required for 8-bit pages: the new rows are
        quantized (`pallas_ops.quant.quantize`) and values and scales written.
    Token i of sequence s goes to position kv_lens[s] - q_len_s + i, i.e. page
    page_indices[s, pos // page_size], row pos % page_size. Rows past cu_q_lens[num_seqs] are not
    written. Returns the updated (k_pages, v_pages) (8-bit pages: and k_scales, v_scales); donate
    the inputs to update in place under jit.
    """
    num_seqs = _as_num_seqs(num_seqs)
    geo = check_static_write(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                             num_seqs, k_scales, v_scales)
    if validate:
        check_paged_attention_inputs(k_new, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    page, row = token_slots(kv_lens, page_indices, cu_q_lens, num_seqs, geo.num_tokens,
                            page_size=geo.page_size, total_pages=geo.total_pages)
    k_pages, v_pages = jnp.asarray(k_pages), jnp.asarray(v_pages)
    quantized = is_quantized(k_pages.dtype)
    if quantized:
        k_scales, v_scales = jnp.asarray(k_scales), jnp.asarray(v_scales)
    if quantized:
        k_new, ks_new = quantize(k_new, k_pages.dtype, scale_dtype=k_scales.dtype)
        v_new, vs_new = quantize(v_new, v_pages.dtype, scale_dtype=v_scales.dtype)
    k_out = k_pages.at[:, page, row].set(jnp.swapaxes(k_new, 0, 1), mode="drop")
    v_out = v_pages.at[:, page, row].set(jnp.swapaxes(v_new, 0, 1), mode="drop")
    if not quantized:
        return k_out, v_out
    return (k_out, v_out, k_scales.at[:, page, row].set(ks_new.T, mode="drop"),
            v_scales.at[:, page, row].set(vs_new.T, mode="drop"))


# The contract's names, for callers that pick a backend module (`paged_attention_xla` or the
# Pallas `paged_attention`) and call the same two functions on it.
paged_attention = paged_attention_xla
write_kv_pages = write_kv_pages_xla
