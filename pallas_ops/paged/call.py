"""The paged attention pallas_call: the wrapper side of `pallas_ops.paged.kernel`.

`run_paged_attention` packs q for GQA, builds the work list (`plan.work_list`), lays out an
8-bit cache's scales along the page tables (`scale_rows`), picks the kernel of the cache layout
(`pallas_ops.paged.layout`) and calls it; `pallas_ops.paged.api` (`paged_attention`) and
`pallas_ops.paged.ragged` (`ragged_paged_attention`) are its public callers.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.chips import CHIPS
from pallas_ops.paged.kernel import interleaved_kernel, quant_split_kernel, split_kernel
from pallas_ops.paged.layout import INTERLEAVED, QUANT_SPLIT, SPLIT
from pallas_ops.paged.plan import vmem_estimate_bytes, vmem_limit_bytes, work_list

# The pallas_call's name= per layout (the HLO custom call and profiles are named after it).
CALL_NAMES = {SPLIT: "dflash_paged_attention", QUANT_SPLIT: "dflash_paged_attention",
              INTERLEAVED: "dflash_ragged_paged_attention"}


SCALE_LANES = 128   # 8-bit caches: scales move in whole 128-key lane runs (512-byte DMA granules)


def _cdiv(a, b):
    return (a + b - 1) // b


def _round_up(a, b):
    return _cdiv(a, b) * b


def scale_page_align(page_size: int) -> int:
    """Pages per 128-key scale granule: KV blocks of an 8-bit cache start on a multiple of it."""
    return max(1, SCALE_LANES // page_size)


def scale_rows(k_scales, v_scales, page_indices, scale_lanes):
    """[Hkv, P, page_size] scales -> [Hkv, S, L] f32 rows along each sequence's page table (slots
    clamped into range; L leaves room for a scale_lanes DMA from any page), so the kernel moves a
    KV block's scales as one contiguous lane run per head (page-sized runs are below the TPU's
    512-byte DMA granule). An XLA gather of 4 bytes per (head, page-table slot, token)."""
    hkv, total_pages, page_size = k_scales.shape
    s_max, pps = page_indices.shape
    table = jnp.clip(page_indices, 0, total_pages - 1)
    length = _round_up(pps * page_size + scale_lanes, SCALE_LANES)

    def rows(sc):
        r = sc[:, table].reshape(hkv, s_max, pps * page_size).astype(jnp.float32)
        return jnp.pad(r, ((0, 0), (0, 0), (0, length - pps * page_size)))

    return rows(k_scales), rows(v_scales)


# ------------------------------------------------------------------------------------------------
# The attention kernel
# ------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("layout", "sm_scale", "soft_cap", "sliding_window",
                                             "out_scale", "bs", "chip", "vmem_limit",
                                             "interpret"))
def run_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, layout,
                        sm_scale, soft_cap, sliding_window, bs, chip, interpret, out_scale=None,
                        vmem_limit=None, sinks=None):
    """The pallas_call of every layout (inputs already checked, block sizes resolved).

    kv_pages: (k_pages, v_pages) [Hkv, P, page_size, D] each for `SPLIT`; (k_pages, v_pages,
    k_scales, v_scales) for `QUANT_SPLIT` (8-bit pages, scales [Hkv, P, page_size] f32/bf16);
    (kv_pages,) [P, page_size, 2 Hkv, D] for `INTERLEAVED`. out_scale: multiplies the output
    (None: 1). vmem_limit: the Mosaic VMEM limit in bytes (None: from the estimate and the chip's
    budget). sinks: None or f32 [Hq], a logit per q head in the softmax denominator.
    """
    t, hq, d = q.shape
    if layout in (SPLIT, QUANT_SPLIT):
        hkv, total_pages, page_size, _ = kv_pages[0].shape
    elif layout == INTERLEAVED:
        total_pages, page_size, combined, _ = kv_pages[0].shape
        hkv = combined // 2
        if bs.kv_heads != hkv:
            raise ValueError(f"the interleaved layout takes all {hkv} KV heads per grid step, "
                             f"got kv_heads={bs.kv_heads}")
        # [P, page_size, 2 Hkv, D] -> [P, page_size * 2 Hkv, D]: merges two major dims of the
        # row-major cache (no data moves when 2 Hkv fills whole sublane tiles).
        kv_pages = (kv_pages[0].reshape(total_pages, page_size * combined, kv_pages[0].shape[3]),)
    else:
        raise ValueError(f"layout must be one of {(SPLIT, QUANT_SPLIT, INTERLEAVED)}, "
                         f"got {layout!r}")
    s_max, pps = page_indices.shape
    scale_lanes = _round_up(bs.kv_tokens, SCALE_LANES)
    if layout == QUANT_SPLIT:
        kv_pages = tuple(kv_pages[:2]) + scale_rows(kv_pages[2], kv_pages[3], page_indices,
                                                    scale_lanes)
    kv_dtype = kv_pages[0].dtype
    cdt = q.dtype if layout == QUANT_SPLIT else kv_dtype   # dtype of the matmuls
    g = hq // hkv
    hb, rows = bs.kv_heads, bs.q_rows
    head_groups = hkv // hb
    cores = CHIPS[chip].tensorcores if chip is not None else 2
    nqb = _cdiv(t, bs.q_tokens)
    while (head_groups * nqb) % cores:  # equal runs per core (padding q blocks are empty)
        nqb += 1
    steps_per_core = head_groups * nqb // cores
    t_pad = nqb * bs.q_tokens
    # GQA packing: [T, Hq, D] -> [Hkv, T_pad * G, D], row = token * G + g.
    qp = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0)))
    qp = qp.reshape(t_pad, hkv, g, d).transpose(1, 0, 2, 3).reshape(hkv, t_pad * g, d)

    work = work_list(kv_lens, cu_q_lens, num_seqs, num_q_blocks=nqb, q_tokens=bs.q_tokens,
                     page_size=page_size, pages_per_block=bs.pages_per_block,
                     sliding_window=sliding_window,
                     page_align=scale_page_align(page_size) if layout == QUANT_SPLIT else 1)
    prefetch = (kv_lens, page_indices.reshape(-1), cu_q_lens) + work

    body = {SPLIT: split_kernel, QUANT_SPLIT: quant_split_kernel,
            INTERLEAVED: interleaved_kernel}[layout]
    kernel = functools.partial(
        body, has_sinks=sinks is not None, sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
        out_scale=out_scale, group=g, page_size=page_size, pages_per_seq=pps,
        head_groups=head_groups, bs=bs)
    def tile_index(c, i, *_):
        g = c * steps_per_core + i
        return lax.div(g, jnp.int32(nqb)), lax.rem(g, jnp.int32(nqb)), 0

    tile = pl.BlockSpec((hb, rows, d), tile_index)
    sink_args, sink_specs = (), []
    if sinks is not None:
        # Row r of a tile is q head kv_head * G + r % G (tiles start at whole tokens): the same
        # [Hkv, q_rows] pattern for every tile of a head group, lane-replicated.
        pattern = jnp.asarray(sinks, jnp.float32).reshape(hkv, g)[:, jnp.arange(rows) % g]
        sink_args = (jnp.broadcast_to(pattern[..., None], (hkv, rows, 128)),)
        sink_specs = [pl.BlockSpec((hb, rows, 128),
                                   lambda c, i, *_: (tile_index(c, i)[0], 0, 0))]
    estimate = vmem_estimate_bytes(q_rows=rows, kv_tokens=bs.kv_tokens, kv_heads=hb, head_dim=d,
                                   q_dtype=q.dtype, kv_dtype=kv_dtype,
                                   words=layout == INTERLEAVED, scales=layout == QUANT_SPLIT)
    kv_item = jnp.dtype(kv_dtype).itemsize
    max_keys = min(pps * page_size, total_pages * page_size)
    cached_keys = min(s_max * pps, total_pages) * hkv * page_size
    cost = pl.CostEstimate(
        flops=4 * t * hq * d * max_keys,
        transcendentals=t * hq * max_keys,
        bytes_accessed=2 * q.size * q.dtype.itemsize + 2 * cached_keys * d * kv_item
        + (2 * cached_keys * 4 if layout == QUANT_SPLIT else 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    if layout in (SPLIT, QUANT_SPLIT):
        kv_scratch = [pltpu.VMEM((2, hb, bs.kv_tokens, d), kv_dtype),
                      pltpu.VMEM((2, hb, bs.kv_tokens, d), kv_dtype),
                      pltpu.SemaphoreType.DMA((2, 2))]
        if layout == QUANT_SPLIT:
            kv_scratch += [pltpu.VMEM((2, hb, scale_lanes), jnp.float32),
                           pltpu.VMEM((2, hb, scale_lanes), jnp.float32),
                           pltpu.SemaphoreType.DMA((2, 2))]
    else:
        words = (bs.kv_tokens * hkv, d) if jnp.dtype(kv_dtype).itemsize == 2 else (8, 128)
        kv_scratch = [pltpu.VMEM((2, bs.kv_tokens * 2 * hkv, d), kv_dtype),
                      pltpu.SemaphoreType.DMA((1, 2)), pltpu.VMEM(words, jnp.uint32)]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((hkv, t_pad * g, d), q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(cores, steps_per_core),
            in_specs=[tile] + sink_specs + [hbm] * len(kv_pages),
            out_specs=tile,
            scratch_shapes=kv_scratch + [
                pltpu.VMEM((hb, rows, d), cdt),
                pltpu.VMEM((hb, rows, 128), jnp.float32),
                pltpu.VMEM((hb, rows, 128), jnp.float32),
                pltpu.VMEM((hb, rows, d), jnp.float32),
                pltpu.SMEM((1,), jnp.int32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=vmem_limit_bytes(estimate, chip, limit=vmem_limit),
            # Every DMA address is in bounds by construction (page indices and buffer offsets are
            # clamped), so the compiler's per-DMA runtime checks (~14 serial scalar bundles each)
            # only cost issue time.
            disable_bounds_checks=True),
        cost_estimate=cost,
        name=CALL_NAMES[layout],
        interpret=interpret,
    )(*prefetch, qp, *sink_args, *kv_pages)
    out = out.reshape(hkv, t_pad, g, d).transpose(1, 0, 2, 3).reshape(t_pad, hq, d)
    return out[:t]
