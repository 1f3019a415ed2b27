"""Benchmark protocol of `pallas_ops.block_attention` (the DFlash draft's attention).

Catalogue shapes: `bench.shapes.BLOCK_ATTENTION` (Qwen3-8B drafter bs=16 and Llama-3.1 drafter
bs=10, Hq=32, Hkv=8, D=128, bf16, B in {1, 32}, ctx 512..32k in a cache of max(8192, ctx) rows;
and the Qwen3 drafter at B=32 over an int8 / float8_e4m3fn context cache with f32 scales,
`shape.cache_dtype`: the functions below then take and count k_scales / v_scales too).

- `build(shape, *, chip, interpret=False)`: the compiled-mode call (the default) with the chip's
  block sizes, fn(q, k_block, v_block, k_cache, v_cache, ctx_lens[, k_scales, v_scales]);
  `concrete_args(shape)`: random arrays for it, ctx_lens = ctx_len (a quantized cache holds
  `pallas_ops.quant.quantize` of random rows).
- `hbm_bytes(shape)`: the bytes that must move for the context actually used (ctx_len, not S_max):
  every valid context key and value once (1 byte each when quantized, plus one scale per KV head
  and token each), the block's q/k/v in and the output out.
- `flops(shape)`: the attention's matmul work, 4 * D flops per (block query, key, q head); every
  block query sees the ctx_len context keys and the bs block keys.
- `main_loop(shape, *, chip)`: for `python -m bench static` (one iteration = one context tile of
  ctx_tile rows for the KV heads of a grid step).
- `append_build`, `append_concrete_args`, `append_hbm_bytes`: the same for `append_context` at
  the same shapes (the block's bs rows appended at ctx_len - bs, so the context ends at ctx_len).

The wall-clock benchmarks are the pytest-benchmark suite `bench/micro/` (its README section).
"""
from __future__ import annotations

import functools

from bench import shapes as shapes_mod

KERNEL = "block_attention"
CALL_NAME = "dflash_block_attention"


def shapes() -> list:
    return list(shapes_mod.BLOCK_ATTENTION)


def find(name: str):
    return shapes_mod.find(KERNEL, name)


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}[dtype]


def _cache_itemsize(shape) -> int:
    return _itemsize(shape.cache_dtype or shape.dtype)


def _scale_bytes_per_row(shape) -> int:
    """Scale bytes per (KV head, token): 0 for a plain cache."""
    return _itemsize(shape.scale_dtype) if shape.quantized else 0


def block_sizes(chip: str):
    """The chip's table entry; env PALLAS_DFLASH_BA_BLOCKS="ctx_tile,kv_heads_per_step" overrides
    it (for block-size sweeps with `python -m bench static`)."""
    import os

    from pallas_ops.block.block_sizes import BlockAttentionBlockSizes, get_block_sizes

    override = os.environ.get("PALLAS_DFLASH_BA_BLOCKS")
    if override:
        tile, hb = (int(x) for x in override.split(","))
        return BlockAttentionBlockSizes(ctx_tile=tile, kv_heads_per_step=hb)
    return get_block_sizes(chip)


def build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args): fn(q, k_block, v_block, k_cache, v_cache, ctx_lens) compiled for `chip`
    (interpret: the kernel's `interpret=`; None selects the execution policy)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.block import block_attention

    dt = jnp.dtype(shape.dtype)
    cdt = jnp.dtype(shape.cache_dtype or shape.dtype)
    B, bs, Hq, Hkv, D = (shape.batch, shape.block_size, shape.num_q_heads, shape.num_kv_heads,
                         shape.head_dim)
    S = jax.ShapeDtypeStruct
    args = (S((B, bs, Hq, D), dt), S((B, bs, Hkv, D), dt), S((B, bs, Hkv, D), dt),
            S((B, Hkv, shape.max_ctx, D), cdt), S((B, Hkv, shape.max_ctx, D), cdt),
            S((B,), jnp.int32))
    fn = functools.partial(block_attention, interpret=interpret, chip=chip,
                           block_sizes=block_sizes(chip))
    if not shape.quantized:
        return fn, args
    scales = S((B, Hkv, shape.max_ctx), jnp.dtype(shape.scale_dtype))

    def quantized(q, k_block, v_block, k_cache, v_cache, ctx_lens, k_scales, v_scales):
        return fn(q, k_block, v_block, k_cache, v_cache, ctx_lens, k_scales=k_scales,
                  v_scales=v_scales)

    return quantized, args + (scales, scales)


def hbm_bytes(shape) -> int:
    """Bytes that must move for ctx_len context rows (not S_max): K/V context (and its scales),
    q/k/v block, out."""
    it = _itemsize(shape.dtype)
    B, bs, Hq, Hkv, D = (shape.batch, shape.block_size, shape.num_q_heads, shape.num_kv_heads,
                         shape.head_dim)
    ctx_kv = 2 * B * Hkv * shape.ctx_len * (D * _cache_itemsize(shape)
                                            + _scale_bytes_per_row(shape))
    block = 2 * B * bs * Hq * D * it + 2 * B * bs * Hkv * D * it   # q in + out; k/v block in
    return ctx_kv + block


def main_loop(shape, *, chip: str = "v5p"):
    """The context-tile loop: one iteration DMAs ctx_tile rows of K and V for the step's heads
    (and, quantized, their scales)."""
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS

    bsz = block_sizes(chip)
    hb = bsz.heads_per_step(shape.num_kv_heads)
    tiles = -(-shape.ctx_len // bsz.ctx_tile)
    steps = shape.batch * (shape.num_kv_heads // hb)
    # Rows actually DMA'd per tile, on average: whole tiles, plus the straddling tile's
    # 128-row chunks below ctx_len (so a 512-row context moves 512 rows, not a 1024-row tile).
    rows = -(-shape.ctx_len // 128) * 128 / tiles
    # A context shorter than one tile (ctx 512 at 1024-row tiles) runs only the masked path, in
    # SUB-row sub-tiles holding its rows: the unmasked body is skipped, the masked body and its
    # sub-tile loop run. Longer contexts: declared as interior tiles (the catalogue's are whole
    # multiples of the tile).
    from pallas_ops.block.kernel import MASKED_SUBTILE

    tile = bsz.ctx_tile
    sub = max(d for d in range(128, min(MASKED_SUBTILE, tile) + 1, 128) if tile % d == 0)
    if tiles == 1 and shape.ctx_len % tile:
        masked_path, sub_tiles = (True, False, False), -(-shape.ctx_len // sub)
    else:
        masked_path, sub_tiles = (False, True, True), 0
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=int(2 * hb * rows * (shape.head_dim * _cache_itemsize(shape)
                                                 + _scale_bytes_per_row(shape))),
        iterations=steps * tiles,
        cores=CHIPS[chip].tensorcores,
        outer_iterations=steps,
        # Forward branches of the tile loop, in schedule order (the same with libtpu 0.0.42.1
        # and 0.0.50.1, and for quantized caches, whose scale DMAs sit beside the value DMAs;
        # checked with `--loops`): the chunked DMA starts of a straddling next tile (+1 nested), then,
        # when B > 1, the last tile's prefetch of the next sequence's first tile (+2 nested),
        # then the unmasked body, the masked body and the guard of its sub-tile loop. An
        # interior tile skips all but the unmasked body, and never enters the sub-tile loop.
        taken_branches=(True,) * (5 if shape.batch > 1 else 2) + masked_path,
        inner_trips=(sub_tiles,),
    )


def flops(shape) -> int:
    """Matmul flops: 4 * D per (block query, visible key, q head); keys = ctx_len + bs."""
    return (4 * shape.batch * shape.block_size * (shape.ctx_len + shape.block_size)
            * shape.num_q_heads * shape.head_dim)


def concrete_args(shape, seed: int = 0):
    """Random q/k/v block and caches, ctx_lens = ctx_len for every sequence (a quantized cache:
    random rows quantized with `pallas_ops.quant.quantize`, and their scales)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops import quant

    _, specs = build(shape)
    key = jax.random.key(seed)
    dt = jnp.dtype(shape.dtype)
    arrays = [jax.random.normal(jax.random.fold_in(key, i), s.shape, dt)
              for i, s in enumerate(specs[:5])]
    lens = jnp.full(specs[5].shape, shape.ctx_len, jnp.int32)
    if not shape.quantized:
        return tuple(arrays) + (lens,)
    (kc, ks), (vc, vs) = (quant.quantize(x, shape.cache_dtype,
                                         scale_dtype=jnp.dtype(shape.scale_dtype))
                          for x in arrays[3:5])
    return tuple(arrays[:3]) + (kc, vc, lens, ks, vs)


def append_build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args) for `append_context` at a block-attention shape: fn(k_cache, v_cache, k_new,
    v_new, ctx_lens, n_new) -> (k_cache, v_cache), the block's bs rows written at ctx_len - bs
    (the accepted block that makes the context ctx_len long: it always fits S_max). Donate the
    caches (arguments 0 and 1) under jit: the kernel updates them in place. `chip` is unused.
    Quantized: fn(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, k_scales, v_scales) ->
    (k_cache, v_cache, k_scales, v_scales), new rows in shape.dtype (donate 0, 1, 6, 7)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.block import append_context

    del chip
    _, specs = build(shape)
    new = specs[1]                                     # [B, bs, Hkv, D]
    lens = jax.ShapeDtypeStruct((shape.batch,), jnp.int32)
    args = (specs[3], specs[4], new, new, lens, lens)
    fn = functools.partial(append_context, interpret=interpret)
    if not shape.quantized:
        return fn, args

    def quantized(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, k_scales, v_scales):
        return fn(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, k_scales=k_scales,
                  v_scales=v_scales)

    return quantized, args + specs[6:8]


def append_offset(shape) -> int:
    """The row the block is appended at (ctx_len - bs, at least 0)."""
    return max(0, shape.ctx_len - shape.block_size)


def append_concrete_args(shape, seed: int = 0):
    import jax.numpy as jnp

    _, k_block, v_block, k_cache, v_cache, _, *scales = concrete_args(shape, seed)
    B = shape.batch
    return (k_cache, v_cache, k_block, v_block,
            jnp.full((B,), append_offset(shape), jnp.int32),
            jnp.full((B,), shape.block_size, jnp.int32), *scales)


def append_hbm_bytes(shape) -> int:
    """Bytes `append_context` must move: the CHUNK_ROWS-row cache chunks covering the new rows
    read and written back, K and V (cache rows are DMA'd in aligned tiles), new rows read once.
    Quantized: 32-row chunks of 1-byte values, the new rows read in shape.dtype (to quantize
    them), and each sequence's bs-token window of scales read and written back."""
    from pallas_ops.block.append import CHUNK_ROWS, QUANT_CHUNK_ROWS

    ch = QUANT_CHUNK_ROWS if shape.quantized else CHUNK_ROWS
    c, n = append_offset(shape), shape.block_size
    chunks = (c + n - 1) // ch - c // ch + 1
    row = shape.num_kv_heads * shape.head_dim * _cache_itemsize(shape)
    new_row = shape.num_kv_heads * shape.head_dim * _itemsize(shape.dtype)
    scales = 2 * n * shape.num_kv_heads * _scale_bytes_per_row(shape)
    return shape.batch * 2 * (2 * chunks * ch * row + n * new_row + scales)
