"""Non-causal block attention over a static context cache: the DFlash draft's attention.

    out = block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens)

Block query i of sequence b sits at absolute position ctx_lens[b] + i and attends, with no causal
mask, to context keys 0..ctx_lens[b]-1 of the static cache and to all bs keys of its own block.
With `sliding_window=W`, context key j is visible to block query i only if j > ctx_lens[b] + i - W;
the block keys always stay visible. See `reference.block` for the float64 reference.

Kernel design (one `pl.pallas_call`, grid (Hkv / heads_per_step parallel, B arbitrary)):
- ctx_lens is scalar-prefetched. The caches stay in HBM (`pl.ANY`); context tiles of ctx_tile rows
  (all KV heads of the step at once) are streamed by manual double-buffered DMA in a loop whose
  trip count is ceil(ctx_len / ctx_tile) (minus the tiles left of a sliding window), so the cost
  grows with ctx_len, not with S_max, and no tile at or past ctx_len is ever DMA'd. The double
  buffer runs across grid steps: the last tile of sequence b overlaps the DMA of the first tile
  of sequence b+1 (same head group, same core).
- All G = Hq/Hkv q heads of a KV head are packed into one matmul's rows: q is laid out as
  [B, Hkv, bs*G (padded to the sublane tile), D] by the wrapper, so a tile costs one
  [rows, D] x [D, ctx_tile] matmul and one [rows, ctx_tile] x [ctx_tile, D] matmul per KV head.
- Online softmax in f32, in base 2 (q pre-scaled by sm_scale * log2 e). The block's own K/V (a small VMEM input) are folded in first, which
  gives every row a finite running max before any context tile, then the context tiles; the block
  K/V are never concatenated onto the cache in HBM.
- Only the tile straddling ctx_len and a sliding window's edge tile run the masked path, in
  512-row sub-tiles holding visible keys only (a 300-row context computes 512 rows, not a
  whole tile); every other tile does no masking. The straddling tile is fetched in DMA_CHUNK-row chunks, only those holding rows
  below ctx_len (so at most DMA_CHUNK - 1 rows past ctx_len are ever read, never past S_max);
  DMA offsets stay aligned to the (8|16, 128) HBM tiling.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.chips import CHIPS, MiB


DMA_CHUNK = 128        # granularity of the DMAs of the tile straddling ctx_len (rows)
MASKED_SUBTILE = 512   # rows per step of the masked path (straddling / sliding-window tiles)


def _sublane(dtype) -> int:
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _online_update(h, s, v, m_ref, l_ref, acc_ref, *, first: bool):
    """Fold scores s [R, T] f32 and values v [T, D] into the running state of head h."""
    m_cur = jnp.max(s, axis=1, keepdims=True)                              # [R, 1]
    if first:
        m_new = m_cur
    else:
        m_prev = m_ref[h][:, 0:1]                                           # [R, 1]
        m_new = jnp.maximum(m_prev, m_cur)
    p = jnp.exp2(s - m_new)                                                 # [R, T]
    l_cur = jnp.sum(p, axis=1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [R, D]
    if first:
        l_new, acc_new = l_cur, pv
    else:
        alpha = jnp.exp2(m_prev - m_new)
        l_new = alpha * l_ref[h][:, 0:1] + l_cur
        acc_new = alpha * acc_ref[h] + pv
    m_ref[h] = jnp.broadcast_to(m_new, m_ref.shape[1:])
    l_ref[h] = jnp.broadcast_to(l_new, l_ref.shape[1:])
    acc_ref[h] = acc_new


def _scores(q, k):
    """q [R, D] . k [T, D]^T -> [R, T] f32 (q is pre-scaled: scores are in log2 units)."""
    return jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _block_attention_kernel(
    # Prefetch
    ctx_lens_ref,   # [B] int32 (SMEM)
    # Inputs
    q_ref,          # [hb, R, D]        q * sm_scale * log2(e); row r = (position r // G, head r % G)
    kb_ref,         # [hb, BSP, D]      block keys, zero-padded to BSP rows
    vb_ref,         # [hb, BSP, D]      block values, zero-padded
    kc_hbm,         # [B, Hkv, S_max, D] context keys (HBM)
    vc_hbm,         # [B, Hkv, S_max, D] context values (HBM)
    # Outputs
    o_ref,          # [hb, R, D]
    # Scratch
    kbuf,           # [2, hb, T, D]     double-buffered context key tiles
    vbuf,           # [2, hb, T, D]     double-buffered context value tiles
    sems,           # DMA semaphores [2 (k, v), 2 (slot)]
    m_ref,          # [hb, R, 128] f32  running max (lane-replicated)
    l_ref,          # [hb, R, 128] f32  running denominator (lane-replicated)
    acc_ref,        # [hb, R, D] f32    running numerator
    base_ref,       # [1] int32 (SMEM)  buffer slot of this step's first tile (set by the step before)
    *, bs, groups, tile, s_max, window,
):
    hb, R, _ = q_ref.shape
    BSP = kb_ref.shape[1]
    SUB = min(MASKED_SUBTILE, tile)
    h0 = pl.program_id(0) * hb
    b = pl.program_id(1)
    num_b = pl.num_programs(1)

    n_chunks = tile // DMA_CHUNK
    full_chunks, rem = divmod(s_max, DMA_CHUNK)   # static: the cache ends in a short chunk if rem

    def copy_pair(bb, t, slot, chunk, rows, op):
        """K and V rows [t*tile + chunk*DMA_CHUNK, + rows) of sequence bb, the step's heads."""
        src = pl.ds(pl.multiple_of(t * tile + chunk * DMA_CHUNK, DMA_CHUNK), rows)
        dst = pl.ds(chunk * DMA_CHUNK, rows)
        for x, (hbm, buf) in enumerate(((kc_hbm, kbuf), (vc_hbm, vbuf))):
            cp = pltpu.make_async_copy(hbm.at[bb, pl.ds(h0, hb), src, :],
                                       buf.at[slot, :, dst, :], sems.at[x, slot])
            getattr(cp, op)()

    def dma(bb, ctx_bb, t, slot, op):
        """Start or wait the DMAs of context tile t of sequence bb. A tile wholly below ctx_len
        moves in one DMA per K/V; the tile straddling ctx_len moves only its DMA_CHUNK-row
        chunks that hold rows below ctx_len (the last one short if the cache ends inside it)."""
        whole = (t + 1) * tile <= ctx_bb
        pl.when(whole)(lambda: copy_pair(bb, t, slot, 0, tile, op))

        @pl.when(jnp.logical_not(whole))
        def _():
            for c in range(n_chunks):
                g = t * n_chunks + c                  # global chunk index
                need = g * DMA_CHUNK < ctx_bb
                if full_chunks:
                    pl.when(need & (g < full_chunks))(
                        functools.partial(copy_pair, bb, t, slot, c, DMA_CHUNK, op))
                if rem:
                    pl.when(need & (g == full_chunks))(
                        functools.partial(copy_pair, bb, t, slot, c, rem, op))

    def tile_range(bb):
        """(ctx_len, first tile, end tile) of sequence bb."""
        c = ctx_lens_ref[bb]
        t_end = jax.lax.div(c + tile - 1, tile)   # c >= 0: truncation = floor
        if window is None:
            return c, jnp.int32(0), t_end
        t0 = jax.lax.div(jnp.maximum(c - window + 1, 0), tile)
        return c, jnp.minimum(t0, t_end), t_end

    ctx, t0, t_end = tile_range(b)
    # The batch axis runs in order on a core ("arbitrary"): each step starts the first tile of
    # the next sequence while it works on its own last tile, so only the first step of a core
    # waits for a cold DMA. base_ref says which slot that prefetched tile is in.
    nb = jnp.minimum(b + 1, num_b - 1)
    n_ctx, n_t0, n_t_end = tile_range(nb)
    has_next = (b + 1 < num_b) & (n_t0 < n_t_end)
    base = jnp.where(b == 0, 0, base_ref[0])

    def prefetch_next(slot):
        @pl.when(has_next)
        def _():
            dma(nb, n_ctx, n_t0, slot, "start")
        base_ref[0] = slot

    @pl.when((b == 0) & (t0 < t_end))
    def _():
        dma(b, ctx, t0, 0, "start")

    @pl.when(t0 >= t_end)          # no context tile here: both slots are free
    def _():
        prefetch_next(0)

    # The block's own keys first: every row gets a finite max before the context tiles.
    for h in range(hb):
        s = _scores(q_ref[h], kb_ref[h])                            # [R, BSP]
        if BSP > bs:
            col = jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(col < bs, s, -jnp.inf)
        _online_update(h, s, vb_ref[h], m_ref, l_ref, acc_ref, first=True)

    def process_full(slot):
        """A tile wholly below ctx_len and wholly inside every row's window: no masking."""
        for h in range(hb):
            s = _scores(q_ref[h], kbuf[slot, h])                            # [R, T]
            _online_update(h, s, vbuf[slot, h], m_ref, l_ref, acc_ref, first=False)

    def process_masked(slot, t):
        """The tile straddling ctx_len, or the sliding window's edge tile: SUB-row sub-tiles,
        only those holding visible keys, with keys at or past ctx_len (NaN included) masked
        and their values zeroed."""
        lo = t * tile
        u_end = jax.lax.div(jnp.minimum(ctx - lo, tile) + SUB - 1, SUB)
        if window is None:
            u0 = jnp.int32(0)
        else:
            u0 = jnp.minimum(jax.lax.div(jnp.maximum(ctx - window + 1 - lo, 0), SUB), u_end)

        def sub(u, carry):
            off = pl.multiple_of(u * SUB, SUB)
            for h in range(hb):
                k = kbuf[slot, h, pl.ds(off, SUB), :]                      # [SUB, D]
                v = vbuf[slot, h, pl.ds(off, SUB), :]                      # [SUB, D]
                s = _scores(q_ref[h], k)                                    # [R, SUB]
                j = lo + off + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
                ok = j < ctx
                if window is not None:
                    row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
                    ok &= row < (j - ctx + window) * groups   # row // G <= j - ctx + W - 1
                s = jnp.where(ok, s, -jnp.inf)
                vj = lo + off + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
                v = jnp.where(vj < ctx, v, jnp.zeros_like(v))
                _online_update(h, s, v, m_ref, l_ref, acc_ref, first=False)
            return carry

        jax.lax.fori_loop(u0, u_end, sub, 0)

    def body(t, carry):
        slot = jax.lax.rem(base + t - t0, 2)

        @pl.when(t + 1 < t_end)
        def _():
            dma(b, ctx, t + 1, 1 - slot, "start")

        @pl.when(t + 1 == t_end)
        def _():
            prefetch_next(1 - slot)

        dma(b, ctx, t, slot, "wait")
        # Masking is needed on the tile straddling ctx_len and, with a window, on tiles that
        # reach down to the window's lower edge for the last block row: key j is visible to
        # every row iff j > ctx + bs - 1 - W.
        needs_mask = (t + 1) * tile > ctx
        if window is not None:
            needs_mask |= t * tile <= ctx + bs - 1 - window

        @pl.when(jnp.logical_not(needs_mask))
        def _():
            process_full(slot)

        @pl.when(needs_mask)
        def _():
            process_masked(slot, t)
        return carry

    jax.lax.fori_loop(t0, t_end, body, 0)

    for h in range(hb):
        o_ref[h] = (acc_ref[h] / l_ref[h][:, 0:1]).astype(o_ref.dtype)


def vmem_estimate(*, hb, rows, bsp, tile, head_dim, dtype) -> int:
    """Bytes of VMEM the kernel needs (pipelined blocks double-buffered, scratch, temporaries)."""
    it = jnp.dtype(dtype).itemsize
    blocks = 2 * (2 * hb * rows * head_dim * it + 2 * hb * bsp * head_dim * it)   # q, out, kb, vb
    tiles = 2 * 2 * hb * tile * head_dim * it                                    # kbuf, vbuf
    state = hb * rows * (2 * 128 + head_dim) * 4                                 # m, l, acc
    temps = 3 * rows * max(tile, bsp) * 4 + 2 * tile * head_dim * 4              # s, p; masked v
    return blocks + tiles + state + temps


def _vmem_budget(chip: str | None) -> int:
    spec = CHIPS.get(chip) if chip else None
    # Off TPU (interpreter) or unknown: the smallest VMEM of the supported generations.
    return spec.vmem_bytes if spec else min(c.vmem_bytes for c in CHIPS.values())


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_sizes", "interpret",
                                             "chip"))
def run_block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, scale, window,
                     block_sizes, interpret, chip):
    B, bs, Hq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    dtype = q.dtype
    sub = _sublane(dtype)
    R = _round_up(bs * G, sub)
    BSP = _round_up(bs, sub)
    hb = block_sizes.heads_per_step(Hkv)
    tile = block_sizes.ctx_tile

    # q rows grouped by KV head: [B, Hkv, bs*G (+pad), D], row r = (block position r // G, head
    # r % G). The softmax runs in base 2 (exp2 saves a multiply per score): q is scaled by
    # sm_scale * log2(e) here, in f32, fused by XLA into the layout change it needs anyway.
    qs = (q.astype(jnp.float32) * (scale * math.log2(math.e))).astype(dtype)
    qr = qs.reshape(B, bs, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, bs * G, D)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - bs * G), (0, 0)))
    kb = jnp.pad(k_block.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, BSP - bs), (0, 0)))
    vb = jnp.pad(v_block.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, BSP - bs), (0, 0)))

    need = vmem_estimate(hb=hb, rows=R, bsp=BSP, tile=tile, head_dim=D, dtype=dtype)
    budget = _vmem_budget(chip)
    if need > budget * 3 // 4:
        raise ValueError(f"block_attention needs ~{need / MiB:.1f} MiB of VMEM, more than 3/4 of "
                         f"the {budget / MiB:.0f} MiB budget: lower block_sizes.ctx_tile or "
                         "kv_heads_per_step")
    vmem_limit = int(min(budget * 3 // 4, max(2 * need, 16 * MiB)))

    it = jnp.dtype(dtype).itemsize
    cost = pl.CostEstimate(
        # Upper bound: ctx_lens is dynamic, so count the full capacity plus the block.
        flops=int(4 * B * Hq * bs * (S_max + bs) * D),
        transcendentals=int(B * Hq * bs * (S_max + bs)),
        bytes_accessed=int(2 * B * Hkv * S_max * D * it + 2 * B * Hq * bs * D * it
                           + 2 * B * Hkv * bs * D * it),
    )
    kernel = functools.partial(_block_attention_kernel, bs=bs, groups=G, tile=tile,
                               s_max=S_max, window=window)
    blk = lambda rows: pl.BlockSpec((None, hb, rows, D), lambda g, b, cl: (b, g, 0, 0))  # noqa
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Hkv, R, D), dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(Hkv // hb, B),   # head groups first: megacore splits them at B=1
            in_specs=[
                blk(R),                                   # q rows
                blk(BSP),                                 # k_block
                blk(BSP),                                 # v_block
                pl.BlockSpec(memory_space=pl.ANY),        # k_cache
                pl.BlockSpec(memory_space=pl.ANY),        # v_cache
            ],
            out_specs=blk(R),
            scratch_shapes=[
                pltpu.VMEM((2, hb, tile, D), dtype),
                pltpu.VMEM((2, hb, tile, D), dtype),
                pltpu.SemaphoreType.DMA((2, 2)),
                pltpu.VMEM((hb, R, 128), jnp.float32),
                pltpu.VMEM((hb, R, 128), jnp.float32),
                pltpu.VMEM((hb, R, D), jnp.float32),
                pltpu.SMEM((1,), jnp.int32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            # Head groups split over TensorCores; the batch axis runs in order on each core
            # (a step prefetches the next sequence's first tile).
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit,
        ),
        cost_estimate=cost,
        name="dflash_block_attention",
        interpret=interpret,
    )(ctx_lens, qr, kb, vb, k_cache, v_cache)

    out = out[:, :, :bs * G].reshape(B, Hkv, bs, G, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, bs, Hq, D)
