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
  512-row sub-tiles (the largest multiple of 128 up to 512 dividing ctx_tile) holding visible
  keys only (a 300-row context computes 512 rows, not a whole tile); every other tile does no
  masking. The straddling tile is fetched in DMA_CHUNK-row chunks, only those holding rows
  below ctx_len (so at most DMA_CHUNK - 1 rows past ctx_len are ever read, never past S_max);
  DMA offsets stay aligned to the (8|16, 128) HBM tiling.

Quantized caches (int8 / float8_e4m3fn / float8_e5m2, `pallas_ops.quant`): the real context value
is ``stored value * scale`` with one scale per (KV head, token), k_scales / v_scales
[B, Hkv, S_max] (f32 or bf16). The 8-bit tiles are DMA'd as they are ((32, 128) HBM tiles, so
S_max % 32 == 0 and every row offset is a multiple of 32: DMA_CHUNK is) and converted in VMEM to
the compute dtype (q's; int8 and fp8 values are exact in bf16; v5e/v5p have no fp8 MXU path, so
the conversion comes before the matmul). The scales are folded into the math, never into the
tiles: a K scale per key multiplies a score column (after q.k), a V scale per key multiplies p
before p.V (the denominator sums the unscaled p); f32 throughout. On the masked path the mask is
applied after the scale (scales at or past ctx_len may be NaN: where(ok, s * ks, -inf),
where(ok, p * vs, 0)).
- Scale layout: per tile, a [heads_per_step, tile] slice of each scale array (a lane vector per
  head over the tile's keys) in a double-buffered [2, hb, tile] VMEM buffer, DMA'd with the
  tile's values (same chunks, semaphores of its own).
- The 512-byte rule: a TPU DMA's contiguous inner slice must be a multiple of 512 bytes (Mosaic
  refuses anything else: "The contiguous inner slice in the DMA transfer must be divisible by 512
  bytes"). In HBM a [B, Hkv, S_max] scale array is tiled over (Hkv, S_max): f32 in (8, 128)
  tiles, where one head's 128 tokens are 512 contiguous bytes; bf16 in (8, 128)(2, 1) tiles,
  where two heads' 128 tokens are packed into 512 contiguous bytes of 32-bit words. So scale DMAs
  move whole DMA_CHUNK = 128-token granules at token offsets that are multiples of 128, and with
  bf16 scales a step's head block starts at an even head (`heads_per_step(..., pairs=True)`).
  Checked by AOT compiles with libtpu 0.0.42.1 and 0.0.50.1 for v5e, v5p and v6e: 16-, 32- and
  64-token slices are refused (f32 and bf16), 128- and 256-token slices at 128-aligned offsets
  compile for any f32 head range and for bf16 head ranges starting at an even head; a bf16
  slice starting at an odd head is refused whatever its length.
- The straddling tile fetches the granules holding rows below ctx_len, like its values: at most
  127 scales past ctx_len. When S_max is not a multiple of 128, the cache's last partial granule
  cannot be DMA'd from the scale arrays: the wrapper passes it (an XLA slice, zero-padded to 128
  tokens) as a separate [B, Hkv, 128] input, DMA'd instead. Nothing at or past S_max is read.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu



DMA_CHUNK = 128        # granularity of the DMAs of the tile straddling ctx_len (rows); also
                       # the scale DMA granule (128 tokens: 512 bytes, see above)
MASKED_SUBTILE = 512   # rows per step of the masked path (straddling / sliding-window tiles)


def _sublane(dtype) -> int:
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _online_update(h, s, v, m_ref, l_ref, acc_ref, *, first: bool, v_scale=None, v_ok=None):
    """Fold scores s [R, T] f32 and values v [T, D] into the running state of head h.

    v_scale [1, T] f32: per-key V scales of a quantized cache, multiplied into p before p.V (the
    denominator sums the unscaled p); v_ok [R, T]: where that product may be used (scales at or
    past ctx_len may be NaN)."""
    m_cur = jnp.max(s, axis=1, keepdims=True)                              # [R, 1]
    if first:
        m_new = m_cur
    else:
        m_prev = m_ref[h][:, 0:1]                                           # [R, 1]
        m_new = jnp.maximum(m_prev, m_cur)
    p = jnp.exp2(s - m_new)                                                 # [R, T]
    l_cur = jnp.sum(p, axis=1, keepdims=True)
    pw = p
    if v_scale is not None:
        pw = p * v_scale
        if v_ok is not None:
            pw = jnp.where(v_ok, pw, 0.0)
    pv = jnp.dot(pw.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [R, D]
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


class _Scales(NamedTuple):
    """The scale refs of a quantized cache (see the module docstring)."""
    k_hbm: object       # [B, Hkv, S_max] f32/bf16 K scales (HBM)
    v_hbm: object       # [B, Hkv, S_max] f32/bf16 V scales (HBM)
    k_tail: object      # [B, Hkv, 128] K scales of the last partial granule, zero-padded (HBM),
    v_tail: object      #   and V's; None when S_max % 128 == 0
    kbuf: object        # [2, hb, T] f32/bf16 double-buffered K scales of the context tiles
    vbuf: object        # [2, hb, T] f32/bf16 double-buffered V scales of the context tiles


def block_attention_kernel(
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
    **kw,
):
    _attend(ctx_lens_ref, q_ref, kb_ref, vb_ref, kc_hbm, vc_hbm, o_ref, kbuf, vbuf, sems, m_ref,
            l_ref, acc_ref, base_ref, None, **kw)


def quantized_block_attention_kernel(
    # Prefetch
    ctx_lens_ref,   # [B] int32 (SMEM)
    # Inputs
    q_ref,          # [hb, R, D]        as in block_attention_kernel (bf16/f32)
    kb_ref,         # [hb, BSP, D]      block keys (bf16/f32, not quantized)
    vb_ref,         # [hb, BSP, D]      block values
    kc_hbm,         # [B, Hkv, S_max, D] int8/fp8 context keys (HBM)
    vc_hbm,         # [B, Hkv, S_max, D] int8/fp8 context values (HBM)
    ks_hbm,         # [B, Hkv, S_max] f32/bf16 K scales (HBM)
    vs_hbm,         # [B, Hkv, S_max] f32/bf16 V scales (HBM)
    kst_hbm,        # [B, Hkv, 128] K scales of rows [S_max - S_max % 128, S_max), zero-padded
                    #   (HBM; None when S_max % 128 == 0, see quantized_kernel_without_tail)
    vst_hbm,        # [B, Hkv, 128] the same for V
    # Outputs
    o_ref,          # [hb, R, D]
    # Scratch
    kbuf,           # [2, hb, T, D] int8/fp8  double-buffered context key tiles
    vbuf,           # [2, hb, T, D] int8/fp8  double-buffered context value tiles
    ksbuf,          # [2, hb, T] f32/bf16     double-buffered K scales of the tiles
    vsbuf,          # [2, hb, T] f32/bf16     double-buffered V scales of the tiles
    sems,           # DMA semaphores [4 (k, v, k scales, v scales), 2 (slot)]
    m_ref,          # [hb, R, 128] f32  running max (lane-replicated)
    l_ref,          # [hb, R, 128] f32  running denominator (lane-replicated)
    acc_ref,        # [hb, R, D] f32    running numerator
    base_ref,       # [1] int32 (SMEM)  buffer slot of this step's first tile
    **kw,
):
    scales = _Scales(ks_hbm, vs_hbm, kst_hbm, vst_hbm, ksbuf, vsbuf)
    _attend(ctx_lens_ref, q_ref, kb_ref, vb_ref, kc_hbm, vc_hbm, o_ref, kbuf, vbuf, sems, m_ref,
            l_ref, acc_ref, base_ref, scales, **kw)


def quantized_kernel_without_tail(ctx_lens_ref, q_ref, kb_ref, vb_ref, kc_hbm, vc_hbm, ks_hbm,
                                   vs_hbm, o_ref, *scratch, **kw):
    """S_max % 128 == 0: no partial scale granule, no tail inputs (refs as above)."""
    quantized_block_attention_kernel(ctx_lens_ref, q_ref, kb_ref, vb_ref, kc_hbm, vc_hbm,
                                      ks_hbm, vs_hbm, None, None, o_ref, *scratch, **kw)


def _attend(ctx_lens_ref, q_ref, kb_ref, vb_ref, kc_hbm, vc_hbm, o_ref, kbuf, vbuf, sems, m_ref,
            l_ref, acc_ref, base_ref, scales, *, bs, groups, tile, s_max, window):
    """The kernel body; `scales` is None for a bf16/f32 cache (refs: see the two kernels)."""
    hb, R, _ = q_ref.shape
    BSP = kb_ref.shape[1]
    # Masked-path sub-tile: the largest multiple of 128 rows up to MASKED_SUBTILE dividing the tile.
    SUB = max(d for d in range(128, min(MASKED_SUBTILE, tile) + 1, 128) if tile % d == 0)
    # First KV head of the step; a static 0 when one step holds every head (Mosaic then knows
    # the offset is tile-aligned: bf16 scales need an even head offset).
    h0 = 0 if hb == kc_hbm.shape[1] else pl.program_id(0) * hb
    b = pl.program_id(1)
    num_b = pl.num_programs(1)
    cdt = q_ref.dtype              # compute dtype: 8-bit tiles are converted to it in VMEM

    def load(x):
        return x if x.dtype == cdt else x.astype(cdt)

    n_chunks = tile // DMA_CHUNK
    full_chunks, rem = divmod(s_max, DMA_CHUNK)   # static: the cache ends in a short chunk if rem

    def copy_pair(bb, t, slot, chunk, rows, op):
        """K and V rows [t*tile + chunk*DMA_CHUNK, + rows) of sequence bb, the step's heads, and
        (quantized) their scales; the short last chunk's scales come from the padded tail copy
        as one whole 128-token granule."""
        src = pl.ds(pl.multiple_of(t * tile + chunk * DMA_CHUNK, DMA_CHUNK), rows)
        dst = pl.ds(chunk * DMA_CHUNK, rows)
        for x, (hbm, buf) in enumerate(((kc_hbm, kbuf), (vc_hbm, vbuf))):
            cp = pltpu.make_async_copy(hbm.at[bb, pl.ds(h0, hb), src, :],
                                       buf.at[slot, :, dst, :], sems.at[x, slot])
            getattr(cp, op)()
        if scales is None:
            return
        for x, (hbm, tail, buf) in enumerate(((scales.k_hbm, scales.k_tail, scales.kbuf),
                                              (scales.v_hbm, scales.v_tail, scales.vbuf))):
            if rows < DMA_CHUNK:
                cp = pltpu.make_async_copy(tail.at[bb, pl.ds(h0, hb), :],
                                           buf.at[slot, :, pl.ds(chunk * DMA_CHUNK, DMA_CHUNK)],
                                           sems.at[2 + x, slot])
            else:
                cp = pltpu.make_async_copy(hbm.at[bb, pl.ds(h0, hb), src], buf.at[slot, :, dst],
                                           sems.at[2 + x, slot])
            getattr(cp, op)()

    def dma(bb, ctx_bb, t, slot, op):
        """Start or wait the DMAs of context tile t of sequence bb. A tile wholly below ctx_len
        moves in one DMA per K/V (and per scale array); the tile straddling ctx_len moves only
        its DMA_CHUNK-row chunks that hold rows below ctx_len (the last one short if the cache
        ends inside it)."""
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

    def tile_scales(slot, h, lanes):
        """The K and V scales [1, lanes] f32 of head h's keys `lanes` of the tile in `slot`."""
        return tuple(buf[slot, pl.ds(h, 1), lanes].astype(jnp.float32)
                     for buf in (scales.kbuf, scales.vbuf))

    def process_full(slot):
        """A tile wholly below ctx_len and wholly inside every row's window: no masking."""
        for h in range(hb):
            s = _scores(q_ref[h], load(kbuf[slot, h]))                      # [R, T]
            vs = None
            if scales is not None:                  # every scale of the tile is valid here
                ks, vs = tile_scales(slot, h, slice(None))
                s = s * ks
            _online_update(h, s, load(vbuf[slot, h]), m_ref, l_ref, acc_ref, first=False,
                           v_scale=vs)

    def process_masked(slot, t):
        """The tile straddling ctx_len, or the sliding window's edge tile: SUB-row sub-tiles,
        only those holding visible keys, with keys at or past ctx_len (NaN included) masked
        and their values zeroed (and, quantized, masked after applying the scales)."""
        lo = t * tile
        u_end = jax.lax.div(jnp.minimum(ctx - lo, tile) + SUB - 1, SUB)
        if window is None:
            u0 = jnp.int32(0)
        else:
            u0 = jnp.minimum(jax.lax.div(jnp.maximum(ctx - window + 1 - lo, 0), SUB), u_end)

        def sub(u, carry):
            off = pl.multiple_of(u * SUB, SUB)
            for h in range(hb):
                k = load(kbuf[slot, h, pl.ds(off, SUB), :])                # [SUB, D]
                v = load(vbuf[slot, h, pl.ds(off, SUB), :])                # [SUB, D]
                s = _scores(q_ref[h], k)                                    # [R, SUB]
                j = lo + off + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
                ok = j < ctx
                if window is not None:
                    row = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
                    ok &= row < (j - ctx + window) * groups   # row // G <= j - ctx + W - 1
                vs = None
                if scales is not None:   # scales at or past ctx_len may be NaN: mask after
                    ks, vs = tile_scales(slot, h, pl.ds(off, SUB))
                    s = s * ks
                s = jnp.where(ok, s, -jnp.inf)
                vj = lo + off + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0)
                v = jnp.where(vj < ctx, v, jnp.zeros_like(v))
                _online_update(h, s, v, m_ref, l_ref, acc_ref, first=False, v_scale=vs,
                               v_ok=None if vs is None else ok)
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
