"""Host-side planning of the paged attention kernel: the work list and the VMEM budget.

`work_list` runs in the wrapper (plain jnp, inside the same jit as the kernel); its arrays are
scalar-prefetched into SMEM. `vmem_estimate_bytes` / `vmem_limit_bytes` size the kernel's VMEM
against the chip's budget before compiling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_ops.chips import CHIPS, MiB


def _cdiv(a, b):
    return (a + b - 1) // b


def work_list(kv_lens, cu_q_lens, num_seqs, *, num_q_blocks, q_tokens, page_size,
              pages_per_block, sliding_window, page_align=1):
    """Per q block: its (q block, sequence) pairs, and per pair the pages it needs.

    Returns int32 arrays:
      pair_start [NQB + 1]: pairs of q block qb are pair_start[qb] : pair_start[qb + 1]
      pair_seq, pair_first_page, pair_num_pages, pair_num_blocks [W] (W = NQB + S)
      block_steps [NQB]: number of (pair, KV block) steps of each q block
    page_align: a pair's first page is rounded down to a multiple of it (8-bit caches: their KV
      blocks start on whole 128-key scale granules; only a sliding window starts past page 0).
    """
    s_max = kv_lens.shape[0]
    n = jnp.reshape(num_seqs, (-1,))[0]
    seq_ids = jnp.arange(s_max, dtype=jnp.int32)
    q_start, q_end = cu_q_lens[:-1], cu_q_lens[1:]
    qb_start = jnp.arange(num_q_blocks, dtype=jnp.int32) * q_tokens          # [NQB]
    qb_end = qb_start + q_tokens
    overlap = ((seq_ids < n) & (q_end > q_start))[None, :] & (
        q_start[None, :] < qb_end[:, None]) & (q_end[None, :] > qb_start[:, None])  # [NQB, S]
    w_max = num_q_blocks + s_max
    (flat,) = jnp.nonzero(overlap.reshape(-1), size=w_max, fill_value=0)
    flat = flat.astype(jnp.int32)
    pair_qb, pair_seq = flat // s_max, flat % s_max
    counts = jnp.sum(overlap, axis=1, dtype=jnp.int32)
    pair_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts, dtype=jnp.int32)])

    # Query positions of the pair's rows: pos(t) = kv_len - q_end + t.
    off = kv_lens[pair_seq] - q_end[pair_seq]
    t_lo = jnp.maximum(q_start[pair_seq], qb_start[pair_qb])
    t_hi = jnp.minimum(q_end[pair_seq], qb_end[pair_qb]) - 1
    pos_lo, pos_hi = off + t_lo, off + t_hi
    if sliding_window is None:
        first_key = jnp.zeros_like(pos_lo)
    else:
        first_key = jnp.maximum(pos_lo - sliding_window + 1, 0)
    first_page = first_key // page_size // page_align * page_align
    num_pages = pos_hi // page_size - first_page + 1
    valid = jnp.arange(w_max, dtype=jnp.int32) < pair_start[-1]
    num_pages = jnp.where(valid, num_pages, 0)
    first_page = jnp.where(valid, first_page, 0)
    num_blocks = _cdiv(num_pages, pages_per_block)
    steps = jax.ops.segment_sum(num_blocks, pair_qb, num_segments=num_q_blocks).astype(jnp.int32)
    return (pair_start, pair_seq.astype(jnp.int32), first_page.astype(jnp.int32),
            num_pages.astype(jnp.int32), num_blocks.astype(jnp.int32), steps)


def vmem_estimate_bytes(*, q_rows, kv_tokens, kv_heads, head_dim, q_dtype, kv_dtype,
                        words=False, scales=False) -> int:
    """VMEM used by one grid step: pipelined q/out tiles, KV double buffers, scratch, temporaries.
    words: the interleaved layout's 32-bit copy of a 16-bit block (`layout.InterleavedKV`).
    scales: an 8-bit cache (scale buffers, and K / V widened to the compute dtype)."""
    qi, ki = jnp.dtype(q_dtype).itemsize, jnp.dtype(kv_dtype).itemsize
    tiles = 2 * 2 * kv_heads * q_rows * head_dim * qi                # q in + out, double-buffered
    kv = 2 * 2 * kv_heads * kv_tokens * head_dim * ki                # K and V, two slots
    if words and ki == 2:
        kv += 2 * kv_heads * kv_tokens * head_dim * ki               # one slot's bytes again
    scratch = kv_heads * q_rows * (head_dim * ki + 2 * 128 * 4 + head_dim * 4)
    temps = 4 * q_rows * kv_tokens * 4 + 2 * kv_tokens * head_dim * 4  # s, p, mask; V sanitise
    if scales:
        kv += 2 * 2 * kv_heads * (-(-kv_tokens // 128) * 128) * 4    # K / V scales, two slots
        temps += 2 * kv_tokens * head_dim * 4                         # widened K and V
    return tiles + kv + scratch + temps


def vmem_limit_bytes(estimate: int, chip: str | None, *, limit: int | None = None) -> int:
    """The Mosaic VMEM limit: `limit` when given (ValueError if the estimate exceeds it), else
    twice the estimate, at least 32 MiB, at most 3/4 of the chip's VMEM."""
    if limit is not None:
        if estimate > limit:
            raise ValueError(f"block sizes need ~{estimate / MiB:.1f} MiB of VMEM, over "
                             f"vmem_limit_bytes={limit} ({limit / MiB:.1f} MiB); raise it or use "
                             "smaller blocks")
        return int(limit)
    budget = CHIPS[chip].vmem_bytes if chip is not None else 64 * MiB
    if estimate > budget * 3 // 4:
        raise ValueError(f"block sizes need ~{estimate / MiB:.1f} MiB of VMEM, over 3/4 of the "
                         f"{budget / MiB:.0f} MiB of {chip or 'the smallest supported chip'}; "
                         "use smaller block_sizes.kv_tokens / kv_heads / q_tokens")
    return int(min(budget * 3 // 4, max(32 * MiB, 2 * estimate)))
