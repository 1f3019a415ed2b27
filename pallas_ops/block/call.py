"""The block attention pallas_call: the wrapper side of `pallas_ops.block.kernel`.

`run_block_attention` packs q (all G q heads of a KV head as the rows of one matmul, pre-scaled
into log2 units), sizes VMEM (`vmem_estimate`), pins an 8-bit cache's scales to HBM and picks the
kernel body; `pallas_ops.block.api.block_attention` is its public caller.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.block.kernel import (DMA_CHUNK, _round_up, _sublane, block_attention_kernel,
                                     quantized_block_attention_kernel,
                                     quantized_kernel_without_tail)
from pallas_ops.chips import CHIPS, MiB


def vmem_estimate(*, hb, rows, bsp, tile, head_dim, dtype, cache_dtype=None,
                  scale_dtype=None) -> int:
    """Bytes of VMEM the kernel needs (pipelined blocks double-buffered, scratch, temporaries).
    cache_dtype / scale_dtype: a quantized cache's (default: a cache of q's dtype)."""
    it = jnp.dtype(dtype).itemsize
    cit = it if cache_dtype is None else jnp.dtype(cache_dtype).itemsize
    blocks = 2 * (2 * hb * rows * head_dim * it + 2 * hb * bsp * head_dim * it)   # q, out, kb, vb
    tiles = 2 * 2 * hb * tile * head_dim * cit                                   # kbuf, vbuf
    state = hb * rows * (2 * 128 + head_dim) * 4                                 # m, l, acc
    temps = 3 * rows * max(tile, bsp) * 4 + 2 * tile * head_dim * 4              # s, p; masked v
    if scale_dtype is not None:
        sit = jnp.dtype(scale_dtype).itemsize
        # ksbuf, vsbuf (heads padded to the sublane tile); the K and V tiles converted to q's
        # dtype (through 32 bits); the scaled p.
        tiles += 2 * 2 * _round_up(hb, _sublane(scale_dtype)) * tile * sit
        temps += 2 * tile * head_dim * (it + 4) + rows * tile * 4
    return blocks + tiles + state + temps


def _vmem_budget(chip: str | None) -> int:
    spec = CHIPS.get(chip) if chip else None
    # Off TPU (interpreter) or unknown: the smallest VMEM of the supported generations.
    return spec.vmem_bytes if spec else min(c.vmem_bytes for c in CHIPS.values())


@functools.partial(jax.jit, static_argnames=("scale", "window", "block_sizes", "interpret",
                                             "chip"))
def run_block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, k_scales=None,
                        v_scales=None, *, scale, window, block_sizes, interpret, chip):
    """The pallas_call (checked inputs; k_scales/v_scales given iff the cache is quantized)."""
    B, bs, Hq, D = q.shape
    Hkv, S_max = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    dtype = q.dtype
    sub = _sublane(dtype)
    R = _round_up(bs * G, sub)
    BSP = _round_up(bs, sub)
    quantized = k_scales is not None
    scale_dtype = k_scales.dtype if quantized else None
    # bf16 scales pack two heads per 32-bit word in HBM: a step's heads start at an even head.
    hb = block_sizes.heads_per_step(Hkv, pairs=scale_dtype == jnp.bfloat16)
    tile = block_sizes.ctx_tile

    # q rows grouped by KV head: [B, Hkv, bs*G (+pad), D], row r = (block position r // G, head
    # r % G). The softmax runs in base 2 (exp2 saves a multiply per score): q is scaled by
    # sm_scale * log2(e) here, in f32, fused by XLA into the layout change it needs anyway.
    qs = (q.astype(jnp.float32) * (scale * math.log2(math.e))).astype(dtype)
    qr = qs.reshape(B, bs, Hkv, G, D).transpose(0, 2, 1, 3, 4).reshape(B, Hkv, bs * G, D)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, R - bs * G), (0, 0)))
    kb = jnp.pad(k_block.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, BSP - bs), (0, 0)))
    vb = jnp.pad(v_block.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, BSP - bs), (0, 0)))

    need = vmem_estimate(hb=hb, rows=R, bsp=BSP, tile=tile, head_dim=D, dtype=dtype,
                         cache_dtype=k_cache.dtype, scale_dtype=scale_dtype)
    budget = _vmem_budget(chip)
    if need > budget * 3 // 4:
        raise ValueError(f"block_attention needs ~{need / MiB:.1f} MiB of VMEM, more than 3/4 of "
                         f"the {budget / MiB:.0f} MiB budget: lower block_sizes.ctx_tile or "
                         "kv_heads_per_step")
    vmem_limit = int(min(budget * 3 // 4, max(2 * need, 16 * MiB)))

    it = jnp.dtype(dtype).itemsize
    cit = jnp.dtype(k_cache.dtype).itemsize
    scale_bytes = 2 * B * Hkv * S_max * jnp.dtype(scale_dtype).itemsize if quantized else 0
    cost = pl.CostEstimate(
        # Upper bound: ctx_lens is dynamic, so count the full capacity plus the block (and, for
        # a quantized cache, its 8-bit values, their scales and the two scale multiplies).
        flops=int(4 * B * Hq * bs * (S_max + bs) * D + (2 * B * Hq * bs * S_max if quantized
                                                        else 0)),
        transcendentals=int(B * Hq * bs * (S_max + bs)),
        bytes_accessed=int(2 * B * Hkv * S_max * D * cit + scale_bytes + 2 * B * Hq * bs * D * it
                           + 2 * B * Hkv * bs * D * it),
    )
    kw = dict(bs=bs, groups=G, tile=tile, s_max=S_max, window=window)
    blk = lambda rows: pl.BlockSpec((None, hb, rows, D), lambda g, b, cl: (b, g, 0, 0))  # noqa
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    # The scales are pinned to HBM: left to XLA, arrays this small are prefetched whole into
    # VMEM before the call (all S_max of them, every call; the kernel's DMAs then become vector
    # copies).
    hbm_spec = pl.BlockSpec(memory_space=pltpu.HBM)
    tiles = [pltpu.VMEM((2, hb, tile, D), k_cache.dtype),     # kbuf
             pltpu.VMEM((2, hb, tile, D), k_cache.dtype)]     # vbuf
    state = [pltpu.VMEM((hb, R, 128), jnp.float32),           # m
             pltpu.VMEM((hb, R, 128), jnp.float32),           # l
             pltpu.VMEM((hb, R, D), jnp.float32),             # acc
             pltpu.SMEM((1,), jnp.int32)]                     # base slot
    if quantized:
        rem = S_max % DMA_CHUNK
        if rem:     # the last partial granule, zero-padded (see the module docstring)
            pad = ((0, 0), (0, 0), (0, DMA_CHUNK - rem))
            tails = tuple(jnp.pad(x[:, :, S_max - rem:], pad) for x in (k_scales, v_scales))
            kernel = functools.partial(quantized_block_attention_kernel, **kw)
        else:
            tails = ()
            kernel = functools.partial(quantized_kernel_without_tail, **kw)
        caches = (k_cache, v_cache) + tuple(
            pltpu.with_memory_space_constraint(x, pltpu.HBM) for x in (k_scales, v_scales) + tails)
        scratch = tiles + [pltpu.VMEM((2, hb, tile), scale_dtype),   # ksbuf
                           pltpu.VMEM((2, hb, tile), scale_dtype),   # vsbuf
                           pltpu.SemaphoreType.DMA((4, 2))] + state
    else:
        kernel = functools.partial(block_attention_kernel, **kw)
        caches = (k_cache, v_cache)
        scratch = tiles + [pltpu.SemaphoreType.DMA((2, 2))] + state
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, Hkv, R, D), dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(Hkv // hb, B),   # head groups first: megacore splits them at B=1
            # q rows, k_block, v_block; the caches (and scales) stay in HBM
            in_specs=[blk(R), blk(BSP), blk(BSP)] + [any_spec] * 2 + [hbm_spec] * (len(caches) - 2),
            out_specs=blk(R),
            scratch_shapes=scratch,
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
    )(ctx_lens, qr, kb, vb, *caches)

    out = out[:, :, :bs * G].reshape(B, Hkv, bs, G, D).transpose(0, 2, 1, 3, 4)
    return out.reshape(B, bs, Hq, D)
