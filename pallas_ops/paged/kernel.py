"""Ragged paged causal attention (the target model's attention) as a hand-written Pallas TPU kernel.

One kernel serves a ragged batch mixing decode (q_len 1), verify (q_len = block size) and prefill
chunks. Layout of the work:

- The wrapper packs q as [Hkv, T_pad * G, D] (row = token * G + g): all G q heads of a KV head are
  the rows of one matmul (GQA packing). A grid step owns `kv_heads` KV heads and `q_tokens`
  consecutive tokens, i.e. a [kv_heads, q_rows, D] tile, loaded (and pre-scaled) once.
- The grid is (core, step): the flat list of (head group, q block) steps is cut into one run per
  TensorCore ("parallel"), walked in order ("arbitrary"), so each step prefetches the first KV
  block of the next step on its core and the pipeline never drains between steps.
- The wrapper (`pallas_ops.paged.plan.work_list`) lists, per q block, the sequences that own rows
  of it ("pairs"), and for each pair the page-table slots it needs: from the first page inside
  the sliding window (or 0) to the page of the pair's last query position. Pages past that are
  never DMA'd.
- The kernel walks the (pair, KV block) steps of its q block in one `fori_loop`, double-buffered:
  while block i is computed, the pages of block i+1 (possibly the next sequence's) are in flight.
  One DMA per page moves all `kv_heads` heads of that page ([kv_heads, page_size, D], strided);
  a full block's DMA starts are unrolled and it is waited for with one semaphore wait per
  buffer; a tail block is handled in power-of-two page chunks (no per-page loop).
- Online softmax in f32 with running max / sum (lane-replicated [rows, 128]) and accumulator in
  VMEM scratch. Rows of the tile owned by another sequence (or padding) are masked to -inf, so
  they are untouched; key columns are masked causally (aligned to the end of the sequence) and
  by the sliding window. Tiles taller than 64 rows are processed in 64-row sub-tiles, and a pair
  computes only the sub-tiles holding its rows.
- V rows that hold no real data in a tail block (pages not DMA'd, rows past kv_len in the last
  page) are zeroed in VMEM before use, so stale or NaN VMEM cannot reach the output.
- Two cache layouts share this body (`pallas_ops.paged.layout`): `paged_attention`'s K and V
  arrays [Hkv, P, page_size, D] (one DMA per page and array), and jax's interleaved kv_pages
  [P, page_size, 2 Hkv, D] of `ragged_paged_attention` (one DMA per page for every head; K and
  V of a head are strided loads of the block). Only the DMAs, the K/V loads and the tail
  zeroing differ (and the interleaved 16-bit block is stored once as 32-bit words first).

The pallas_call (q packing, work list, scale layout) is `pallas_ops.paged.call`; the public
wrapper (static checks, block sizes) is `pallas_ops.paged.api.paged_attention`.
`write_kv_pages` (`pallas_ops.paged.write`) is a second kernel: page-wise
read-modify-write of the pages that receive new tokens, in place on the aliased page arrays.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_ops.paged.block_sizes import ResolvedBlockSizes
from pallas_ops.paged.layout import InterleavedKV, QuantSplitKV, SplitKV

NEG_INF = float("-inf")


_WORK = 9   # scalar-prefetch refs: kv_lens, page_table, cu_q_lens and the work list (6 arrays)


def split_kernel(*refs, has_sinks, **config):
    """`paged_attention`'s layout: K and V in two arrays."""
    it = iter(refs)
    # Prefetch (SMEM, int32): the batch and the work list (`plan.work_list`)
    work = tuple(next(it) for _ in range(_WORK))   # kv_lens [S], page_table [S * pages_per_seq],
    # cu_q_lens [S + 1], pair_start [NQB + 1], pair_seq / pair_first_page / pair_num_pages /
    # pair_num_blocks [W], block_steps [NQB]
    # Inputs
    q_ref = next(it)          # [hb, q_rows, D] VMEM, packed q tile (row = token * G + g)
    sink_ref = next(it) if has_sinks else None   # [hb, q_rows, 128] f32 VMEM, sink logit per row
    k_hbm = next(it)          # [Hkv, P, page_size, D] HBM
    v_hbm = next(it)          # [Hkv, P, page_size, D] HBM
    # Outputs
    o_ref = next(it)          # [hb, q_rows, D] VMEM
    # Scratch
    k_buf = next(it)          # [2, hb, kv_tokens, D] VMEM, double-buffered K block
    v_buf = next(it)          # [2, hb, kv_tokens, D] VMEM, double-buffered V block
    sems = next(it)           # DMA semaphores [2 (K, V), 2 (slot)]
    state = tuple(it)         # qs, m, l, acc, slot: see `_attention_body`
    _attention_body(work, q_ref, sink_ref, o_ref, SplitKV(k_hbm, v_hbm, k_buf, v_buf, sems),
                    *state, **config)


def quant_split_kernel(*refs, has_sinks, **config):
    """`paged_attention` over 8-bit pages with per-(KV head, token) scales."""
    it = iter(refs)
    # Prefetch (SMEM, int32): as `split_kernel`
    work = tuple(next(it) for _ in range(_WORK))
    # Inputs
    q_ref = next(it)          # [hb, q_rows, D] VMEM, packed q tile (row = token * G + g)
    sink_ref = next(it) if has_sinks else None   # [hb, q_rows, 128] f32 VMEM, sink logit per row
    k_hbm = next(it)          # [Hkv, P, page_size, D] int8 / fp8 HBM
    v_hbm = next(it)          # [Hkv, P, page_size, D] int8 / fp8 HBM
    ks_hbm = next(it)         # [Hkv, S, L] f32 HBM: K scales along each sequence's page table
    vs_hbm = next(it)         # [Hkv, S, L] f32 HBM: V scales
    # Outputs
    o_ref = next(it)          # [hb, q_rows, D] VMEM
    # Scratch
    k_buf = next(it)          # [2, hb, kv_tokens, D] int8 / fp8 VMEM, double-buffered K block
    v_buf = next(it)          # [2, hb, kv_tokens, D] int8 / fp8 VMEM, double-buffered V block
    sems = next(it)           # DMA semaphores [2 (K, V), 2 (slot)]
    ks_buf = next(it)         # [2, hb, scale_lanes] f32 VMEM, the block's K scales per head
    vs_buf = next(it)         # [2, hb, scale_lanes] f32 VMEM, the block's V scales per head
    ssems = next(it)          # DMA semaphores [2 (K, V scales), 2 (slot)]
    state = tuple(it)         # qs, m, l, acc, slot: see `_attention_body`
    qs_ref = state[0]
    kv = QuantSplitKV(k_hbm, v_hbm, ks_hbm, vs_hbm, k_buf, v_buf, ks_buf, vs_buf, sems, ssems,
                      compute_dtype=qs_ref.dtype, page_size=config["page_size"])
    _attention_body(work, q_ref, sink_ref, o_ref, kv, *state, **config)


def interleaved_kernel(*refs, has_sinks, **config):
    """`ragged_paged_attention`'s layout (jax's): K and V interleaved per head in one array."""
    it = iter(refs)
    # Prefetch (SMEM, int32): as `split_kernel`
    work = tuple(next(it) for _ in range(_WORK))
    # Inputs
    q_ref = next(it)          # [hb, q_rows, D] VMEM, packed q tile (row = token * G + g)
    sink_ref = next(it) if has_sinks else None   # [hb, q_rows, 128] f32 VMEM, sink logit per row
    kv_hbm = next(it)         # [P, page_size * 2 Hkv, D] HBM, row = token * 2 Hkv + 2h (K), + 1 (V)
    # Outputs
    o_ref = next(it)          # [hb, q_rows, D] VMEM
    # Scratch
    kv_buf = next(it)         # [2, kv_tokens * 2 Hkv, D] VMEM, double-buffered K/V block (hb = Hkv)
    sems = next(it)           # DMA semaphores [1, 2 (slot)]
    words_ref = next(it)      # [kv_tokens * Hkv, D] uint32 VMEM, 16-bit caches: the block as (K, V)
                              # words of a head (layout.InterleavedKV); [8, 128] unused for f32
    state = tuple(it)         # qs, m, l, acc, slot: see `_attention_body`
    words = words_ref if kv_buf.dtype.itemsize == 2 else None
    kv = InterleavedKV(kv_hbm, kv_buf, sems, words, num_kv_heads=q_ref.shape[0])
    _attention_body(work, q_ref, sink_ref, o_ref, kv, *state, **config)


def _attention_body(
    work, q_ref, sink_ref, o_ref, kv: SplitKV | QuantSplitKV | InterleavedKV,
    qs_ref,   # [hb, q_rows, D] VMEM, q * sm_scale in the compute dtype
    m_ref,    # [hb, q_rows, 128] f32 VMEM, running max (lane-replicated)
    l_ref,    # [hb, q_rows, 128] f32 VMEM, running sum (lane-replicated)
    acc_ref,  # [hb, q_rows, D] f32 VMEM, running numerator
    slot_ref,  # [1] int32 SMEM, KV buffer slot holding the next grid step's first block
    *,
    sm_scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    out_scale: float | None,
    group: int,
    page_size: int,
    pages_per_seq: int,
    head_groups: int,
    bs: ResolvedBlockSizes,
):
    """The kernel body of every layout (`kv`: `pallas_ops.paged.layout`); the module docstring.
    sink_ref: None, or a learned logit per q row that joins the softmax denominator and attends
    to nothing (the running max starts at it, with a running sum of 1)."""
    (kv_lens_ref, page_table_ref, cu_q_lens_ref, pair_start_ref, pair_seq_ref,
     pair_first_page_ref, pair_num_pages_ref, pair_num_blocks_ref, block_steps_ref) = work
    hb, q_rows, head_dim = q_ref.shape
    ppb, kv_tokens = bs.pages_per_block, bs.kv_tokens
    # Grid (core, step): the flat list of (head group, q block) steps is cut into one contiguous
    # run per TensorCore ("parallel" axis), each run walked in order ("arbitrary" axis), so a
    # step can prefetch the first KV block of the next step on the same core.
    # (lax.div/rem, not // and %: floor division lowers through `sign`, which needs a TPU at
    # trace time; all operands are non-negative, so truncation is the same.)
    steps_per_core = pl.num_programs(1)
    num_q_blocks = lax.div(pl.num_programs(0) * steps_per_core, jnp.int32(head_groups))
    i = pl.program_id(1)
    g = pl.program_id(0) * steps_per_core + i

    def step_of(g):
        """(first KV head, q block) of flat grid step g."""
        return lax.div(g, num_q_blocks) * hb, lax.rem(g, num_q_blocks)

    h0, qb = step_of(g)
    h0_next, qb_next = step_of(jnp.minimum(g + 1, num_q_blocks * head_groups - 1))
    next_has_work = (i + 1 < steps_per_core) & (block_steps_ref[qb_next] > 0)
    cdt = kv.dtype

    if sink_ref is None:
        m_ref[...] = jnp.full(m_ref.shape, NEG_INF, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    else:   # exp(sink - m) joins the denominator: m starts at the sink with a running sum of 1
        m_ref[...] = sink_ref[...]
        l_ref[...] = jnp.ones(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    qs_ref[...] = (q_ref[...].astype(jnp.float32) * sm_scale).astype(cdt)

    n_steps = block_steps_ref[qb]
    w_first = pair_start_ref[qb]

    def block_pages(w, b):
        """(sequence, first page-table slot, pages to load) of KV block b of pair w."""
        first = pair_first_page_ref[w] + b * ppb
        n = jnp.minimum(ppb, pair_num_pages_ref[w] - b * ppb)
        return pair_seq_ref[w], first, n

    total_pages = kv.total_pages

    def page_copies(seq, slot_in_table, j, buf_slot, h0):
        # The clamps change nothing for valid input (pages in use are in range, j < ppb) but let
        # the compiler prove the DMA addresses in bounds and drop its per-DMA bounds checks.
        page = jnp.clip(page_table_ref[seq * pages_per_seq + slot_in_table], 0, total_pages - 1)
        if not isinstance(j, int):
            j = jnp.clip(j, 0, ppb - 1)
        dst = pl.ds(pl.multiple_of(j * page_size, page_size), page_size)
        return kv.copies(page, dst, buf_slot, h0)

    # Page counts below ppb (tail blocks) are handled in power-of-two chunks: every chunk is
    # straight-line code (DMA starts unrolled, one semaphore wait per chunk, one store per
    # chunk), at most log2(ppb) + 1 branches instead of a loop with a trip per page.
    chunks = [1 << k for k in range(max(1, ppb - 1).bit_length() - 1, -1, -1)]

    def for_chunks(count, fn):
        """fn(offset, c) for the power-of-two chunks c of `count` (< 2 * chunks[0]), in order."""
        off = jnp.int32(0)
        for c in chunks:
            has = (count & c) != 0

            @pl.when(has)
            def _(off=off, c=c):
                fn(off, c)

            off = off + jnp.where(has, c, 0)

    def start_block(w, b, buf_slot, h0):
        seq, first, n = block_pages(w, b)

        def start_page(j):
            for copy in page_copies(seq, first + j, j, buf_slot, h0):
                copy.start()

        for copy in kv.block_copies(seq, first, buf_slot, h0):   # per block: 8-bit scales
            copy.start()

        @pl.when(n == ppb)
        def _():  # a full block: unrolled, so the scalar work of consecutive pages overlaps
            for j in range(ppb):
                start_page(j)

        @pl.when(n < ppb)
        def _():
            for_chunks(n, lambda off, c: [start_page(off + jj) for jj in range(c)])

    def wait_pages(buf_slot, c):
        """Wait for c pages' bytes of K and of V in buffer slot buf_slot (sizes matter only)."""
        kv.wait(buf_slot, pl.ds(0, c * page_size))

    def wait_block(w, b, buf_slot):
        _, _, n = block_pages(w, b)
        kv.wait_block(buf_slot)

        @pl.when(n == ppb)
        def _():  # a full block: one wait per buffer, for all its pages' bytes
            wait_pages(buf_slot, ppb)

        @pl.when(n < ppb)
        def _():
            for_chunks(n, lambda off, c: wait_pages(buf_slot, c))

    def sanitize_tail(w, b, buf_slot):
        """Zero V rows without real data: pages not loaded, rows at or past kv_len (the
        interleaved layout zeroes K with them: one store per token row)."""
        seq, first, n = block_pages(w, b)
        valid_end = jnp.minimum(n * page_size, kv_lens_ref[seq] - first * page_size)
        if isinstance(kv, QuantSplitKV):
            # 8-bit blocks: keys outside [begin, valid_end) get V scale 0 (and, in fp8, V 0).
            # With a sliding window a pair's first page is rounded down to the scale granule,
            # so its first block may also start left of every query's window.
            begin = jnp.int32(0)
            if sliding_window is not None:
                t_lo = jnp.maximum(cu_q_lens_ref[seq], qb * bs.q_tokens)
                pos_lo = kv_lens_ref[seq] - cu_q_lens_ref[seq + 1] + t_lo
                begin = jnp.maximum(pos_lo - sliding_window + 1 - first * page_size, 0)

            @pl.when((valid_end < kv_tokens) | (begin > 0))
            def _():
                kv.zero_scales(buf_slot, begin, valid_end)

        @pl.when(valid_end < kv_tokens)
        def _():
            part = lax.div(valid_end, jnp.int32(page_size))    # first page not wholly valid
            rem = valid_end - part * page_size

            @pl.when(rem > 0)
            def _():  # the last loaded page, past kv_len
                rows = pl.ds(pl.multiple_of(part * page_size, page_size), page_size)
                kv.keep_rows(buf_slot, rows, page_size, rem)

            start = part + jnp.where(rem > 0, 1, 0)            # pages start .. ppb - 1: zeros

            def zero(off, c):
                rows = pl.ds(pl.multiple_of((start + off) * page_size, page_size), c * page_size)
                kv.zero_rows(buf_slot, rows, c * page_size)

            for_chunks(ppb - start, zero)

    sub_rows = bs.sub_rows

    def compute_rows(r0, seq, first, buf_slot):
        """Online-softmax update of q rows r0 : r0 + sub_rows with the block's keys."""
        q_lo, q_hi = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        off = kv_lens_ref[seq] - q_hi                     # query position = off + token
        base = first * page_size                          # key position of column 0
        rows = pl.ds(r0, sub_rows)
        row_tok = qb * bs.q_tokens + lax.div(
            r0 + lax.broadcasted_iota(jnp.int32, (sub_rows, 1), 0), jnp.int32(group))
        row_ok = (row_tok >= q_lo) & (row_tok < q_hi)     # [sub_rows, 1]
        # key position - query token; causal: kp <= off + t  <=>  kp - t <= off
        diff = base + lax.broadcasted_iota(jnp.int32, (sub_rows, kv_tokens), 1) - row_tok
        mask = row_ok & (diff <= off)
        if sliding_window is not None:
            mask = mask & (diff > off - sliding_window)

        for h in range(hb):
            s = lax.dot_general(qs_ref[h, rows], kv.k(buf_slot, h), (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)   # [sub_rows, kv_tokens]
            k_scale, v_scale = kv.k_scale(buf_slot, h), kv.v_scale(buf_slot, h)
            if k_scale is not None:   # 8-bit K: one scale per key scales its score column
                s = s * k_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(mask, s, NEG_INF)
            # Running stats stay lane-replicated [sub_rows, 128]: widening them to the key or
            # head dim is then a free vreg repeat instead of a lane broadcast.
            m_prev, l_prev = m_ref[h, rows], l_ref[h, rows]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
            p = jnp.exp(s - _lanes(m_safe, kv_tokens))
            alpha = jnp.exp(m_prev - m_safe)
            l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
            pv_p = p if v_scale is None else p * v_scale   # 8-bit V: its scale per key scales p
            pv = lax.dot_general(pv_p.astype(cdt), kv.v(buf_slot, h), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)  # [sub_rows, D]
            acc_ref[h, rows] = _lanes(alpha, head_dim) * acc_ref[h, rows] + pv
            m_ref[h, rows] = m_new
            l_ref[h, rows] = l_new

    def compute_block(w, b, buf_slot):
        seq, first, _ = block_pages(w, b)
        if sub_rows == q_rows:
            compute_rows(0, seq, first, buf_slot)
            return
        # Only the row sub-tiles holding this sequence's rows: in a ragged q block (decode and
        # verify rows beside a prefill chunk) a pair does not pay for the whole tile.
        t0 = qb * bs.q_tokens
        r_lo = (jnp.maximum(cu_q_lens_ref[seq], t0) - t0) * group
        r_hi = (jnp.minimum(cu_q_lens_ref[seq + 1], t0 + bs.q_tokens) - t0) * group
        sub = jnp.int32(sub_rows)

        def one(st, carry):
            compute_rows(pl.multiple_of(st * sub_rows, sub_rows), seq, first, buf_slot)
            return carry

        lax.fori_loop(lax.div(r_lo, sub), lax.div(r_hi - 1, sub) + 1, one, 0)

    # The first KV block of this step: already in flight (prefetched by the previous step on
    # this core) unless this is the core's first step.
    slot_first = jnp.where(i == 0, 0, slot_ref[0])

    @pl.when((i == 0) & (n_steps > 0))
    def _():
        start_block(w_first, 0, 0, h0)

    w_first_next = pair_start_ref[qb_next]

    def step(j, carry):
        w, b, buf_slot = carry
        last = b + 1 >= pair_num_blocks_ref[w]
        w_next = jnp.where(last, w + 1, w)
        b_next = jnp.where(last, 0, b + 1)
        # Prefetch the next KV block: of this step, or else the first one of the next step.
        more = j + 1 < n_steps
        tgt_w = jnp.where(more, w_next, w_first_next)
        tgt_b = jnp.where(more, b_next, 0)
        tgt_h0 = jnp.where(more, h0, h0_next)

        @pl.when(more | next_has_work)
        def _():
            start_block(tgt_w, tgt_b, 1 - buf_slot, tgt_h0)

        wait_block(w, b, buf_slot)
        sanitize_tail(w, b, buf_slot)
        kv.prepare(buf_slot)
        compute_block(w, b, buf_slot)
        return w_next, b_next, 1 - buf_slot

    _, _, slot_end = lax.fori_loop(0, n_steps, step, (w_first, jnp.int32(0), slot_first))

    @pl.when((n_steps == 0) & next_has_work)
    def _():  # an empty step still hands the next one its first block
        start_block(w_first_next, 0, slot_end, h0_next)

    slot_ref[0] = slot_end

    for h in range(hb):
        l = _lanes(l_ref[h], head_dim)
        out = acc_ref[h] / jnp.where(l > 0.0, l, 1.0)
        if out_scale is not None:   # ragged_paged_attention's v_scale
            out = out * out_scale
        o_ref[h] = out.astype(o_ref.dtype)


def _lanes(x, n):
    """[rows, 128] lane-replicated -> [rows, n] with the same value in every lane."""
    if n % 128 == 0:
        return x if n == 128 else jnp.concatenate([x] * (n // 128), axis=1)
    if n < 128:
        return x[:, :n]
    return jnp.broadcast_to(x[:, :1], (x.shape[0], n))
