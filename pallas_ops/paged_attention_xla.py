"""Plain-jnp (XLA) `paged_attention` and `write_kv_pages`: the same contract as the Pallas kernels.

The model layer's fast backend off TPU (and a second, independent implementation to test
against). Jittable with fixed shapes; every static option is keyword-only. The attention gathers,
per q row, the pages of that row's sequence (chunked with `lax.map`, so memory stays at
`chunk * Hkv * pages_per_seq * page_size * D`), masks causally (aligned to the end) and by the
sliding window, and takes an f32 softmax. Masked keys/values never reach the output, even when
they hold NaN: unused page-table slots are replaced by page 0 before the gather and masked values
are zeroed before p.V.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_ops.paged_attention_validation import (
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


def paged_attention_xla(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                        sm_scale=None, soft_cap=None, sliding_window=None, validate=False,
                        rows_per_chunk=16):
    """Ragged paged causal attention in plain jnp.

    Args:
      q: [T, Hq, D] bf16/f32, the new tokens of all sequences concatenated in sequence order.
      k_pages, v_pages: [Hkv, P, page_size, D] bf16/f32 (same dtype).
      kv_lens: int32 [S], keys per sequence counting its new tokens.
      page_indices: int32 [S, pages_per_seq], the page table.
      cu_q_lens: int32 [S + 1], sequence s owns q rows cu_q_lens[s]:cu_q_lens[s + 1].
      num_seqs: int32 scalar or [1], sequences in use.
      sm_scale: softmax scale (default 1/sqrt(D)); soft_cap: logits -> c * tanh(logits / c);
      sliding_window: a query at position p sees keys at positions > p - sliding_window.
      validate: check the dynamic facts on the host first (needs concrete arrays).
      rows_per_chunk: q rows processed together by `lax.map` (memory/speed trade-off only).
    Returns: [T, Hq, D] in q's dtype; rows past cu_q_lens[num_seqs] are zeros.
    """
    num_seqs = _as_num_seqs(num_seqs)
    geo = check_static_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                 sm_scale=sm_scale, soft_cap=soft_cap,
                                 sliding_window=sliding_window)
    if validate:
        check_paged_attention_inputs(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    scale = 1.0 / math.sqrt(geo.head_dim) if sm_scale is None else float(sm_scale)
    t_rows, hkv, g, d = geo.num_tokens, geo.num_kv_heads, geo.group, geo.head_dim
    ps, pps = geo.page_size, geo.pages_per_seq
    length = pps * ps

    seq, pos, valid = row_sequence_info(cu_q_lens, kv_lens, num_seqs, t_rows)
    # Page table with every slot a sequence does not need replaced by page 0 (never out of range).
    n = jnp.reshape(num_seqs, (-1,))[0]
    slot = jnp.arange(pps, dtype=jnp.int32)
    needed = (slot[None, :] * ps < kv_lens[:, None]) & (
        jnp.arange(geo.max_seqs, dtype=jnp.int32)[:, None] < n)
    table = jnp.where(needed, page_indices, 0)
    table = jnp.clip(table, 0, geo.total_pages - 1)

    key_pos = jnp.arange(length, dtype=jnp.int32)

    def one_row(args):
        q_row, s_i, p_i, ok = args                       # [Hq, D], (), (), ()
        pages = table[s_i]                               # [pps]
        k = k_pages[:, pages].reshape(hkv, length, d).astype(jnp.float32)
        v = v_pages[:, pages].reshape(hkv, length, d).astype(jnp.float32)
        mask = (key_pos <= p_i) & ok
        if sliding_window is not None:
            mask = mask & (key_pos > p_i - sliding_window)
        qf = q_row.astype(jnp.float32).reshape(hkv, g, d)
        logits = jnp.einsum("hgd,hld->hgl", qf, k,
                            precision=jax.lax.Precision.HIGHEST) * scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        logits = jnp.where(mask[None, None, :], logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.where(mask[None, None, :], jnp.exp(logits - m), 0.0)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        v = jnp.where(mask[None, :, None], v, 0.0)
        out = jnp.einsum("hgl,hld->hgd", p, v, precision=jax.lax.Precision.HIGHEST)
        out = out / jnp.where(denom > 0, denom, 1.0)
        return out.reshape(hkv * g, d).astype(q.dtype)

    return jax.lax.map(one_row, (q, seq, pos, valid), batch_size=min(rows_per_chunk, t_rows))


def write_kv_pages_xla(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                       num_seqs, *, validate=False):
    """Writes the new tokens' keys/values into their pages (plain jnp scatter).

    Args:
      k_pages, v_pages: [Hkv, P, page_size, D]; k_new, v_new: [T, Hkv, D] (same dtype).
      kv_lens, page_indices, cu_q_lens, num_seqs: as in `paged_attention_xla`.
    Token i of sequence s goes to position kv_lens[s] - q_len_s + i, i.e. page
    page_indices[s, pos // page_size], row pos % page_size. Rows past cu_q_lens[num_seqs] are not
    written. Returns the updated (k_pages, v_pages); donate the inputs to update in place under jit.
    """
    num_seqs = _as_num_seqs(num_seqs)
    geo = check_static_write(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                             num_seqs)
    if validate:
        check_paged_attention_inputs(k_new, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    ps = geo.page_size
    seq, pos, valid = row_sequence_info(cu_q_lens, kv_lens, num_seqs, geo.num_tokens)
    slot = jnp.clip(pos // ps, 0, geo.pages_per_seq - 1)
    page = page_indices[seq, slot]
    page = jnp.where(valid, page, geo.total_pages)       # out of range: dropped
    row = jnp.where(valid, pos % ps, 0)
    k_out = k_pages.at[:, page, row].set(jnp.swapaxes(k_new, 0, 1), mode="drop")
    v_out = v_pages.at[:, page, row].set(jnp.swapaxes(v_new, 0, 1), mode="drop")
    return k_out, v_out


# The contract's names, for callers that pick a backend module (`paged_attention_xla` or the
# Pallas `paged_attention`) and call the same two functions on it.
paged_attention = paged_attention_xla
write_kv_pages = write_kv_pages_xla
