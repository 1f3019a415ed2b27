"""Benchmark protocol of `pallas_ops.block_attention` (the DFlash draft's attention).

Catalogue shapes: `bench.shapes.BLOCK_ATTENTION` (Qwen3-8B drafter bs=16 and Llama-3.1 drafter
bs=10, Hq=32, Hkv=8, D=128, bf16, B in {1, 32}, ctx 512..32k in a cache of max(8192, ctx) rows).

- `build(shape, *, chip)`: the compiled-mode call with the chip's block sizes.
- `hbm_bytes(shape)`: the bytes that must move for the context actually used (ctx_len, not S_max):
  every valid context key and value once, the block's q/k/v in and the output out.
- `main_loop(shape, *, chip)`: for `python -m bench static` (one iteration = one context tile of
  ctx_tile rows for the KV heads of a grid step).
- `main()`: wall clock on a TPU (time and % of the HBM roofline); off TPU the bytes and the v5p
  floor at the HBM bandwidth of `pallas_ops.chips.CHIPS["v5p"]`, marked not measured.
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
    return {"bfloat16": 2, "float32": 4}[dtype]


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


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(q, k_block, v_block, k_cache, v_cache, ctx_lens) compiled for `chip`."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.block import block_attention

    dt = jnp.dtype(shape.dtype)
    B, bs, Hq, Hkv, D = (shape.batch, shape.block_size, shape.num_q_heads, shape.num_kv_heads,
                         shape.head_dim)
    S = jax.ShapeDtypeStruct
    args = (S((B, bs, Hq, D), dt), S((B, bs, Hkv, D), dt), S((B, bs, Hkv, D), dt),
            S((B, Hkv, shape.max_ctx, D), dt), S((B, Hkv, shape.max_ctx, D), dt),
            S((B,), jnp.int32))
    fn = functools.partial(block_attention, interpret=False, chip=chip,
                           block_sizes=block_sizes(chip))
    return fn, args


def hbm_bytes(shape) -> int:
    """Bytes that must move for ctx_len context rows (not S_max): K/V context, q/k/v block, out."""
    it = _itemsize(shape.dtype)
    B, bs, Hq, Hkv, D = (shape.batch, shape.block_size, shape.num_q_heads, shape.num_kv_heads,
                         shape.head_dim)
    ctx_kv = 2 * B * Hkv * shape.ctx_len * D * it
    block = 2 * B * bs * Hq * D * it + 2 * B * bs * Hkv * D * it   # q in + out; k/v block in
    return ctx_kv + block


def main_loop(shape, *, chip: str = "v5p"):
    """The context-tile loop: one iteration DMAs ctx_tile rows of K and V for the step's heads."""
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS

    bsz = block_sizes(chip)
    hb = bsz.heads_per_step(shape.num_kv_heads)
    tiles = -(-shape.ctx_len // bsz.ctx_tile)
    steps = shape.batch * (shape.num_kv_heads // hb)
    # Rows actually DMA'd per tile, on average: whole tiles, plus the straddling tile's
    # 128-row chunks below ctx_len (so a 512-row context moves 512 rows, not a 1024-row tile).
    rows = -(-shape.ctx_len // 128) * 128 / tiles
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=int(2 * hb * rows * shape.head_dim * _itemsize(shape.dtype)),
        iterations=steps * tiles,
        cores=CHIPS[chip].tensorcores,
        outer_iterations=steps,
        # Forward branches of the tile loop, in schedule order (the same with libtpu 0.0.42.1
        # and 0.0.50.1, checked with `--loops`): the chunked DMA starts of a straddling next tile (+1 nested), then,
        # when B > 1, the last tile's prefetch of the next sequence's first tile (+2 nested),
        # then the unmasked body, the masked body and the guard of its sub-tile loop. An
        # interior tile skips all but the unmasked body, and never enters the sub-tile loop.
        taken_branches=(True,) * (5 if shape.batch > 1 else 2) + (False, True, True),
        inner_trips=(0,),
    )


def _inputs(shape, specs):
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    arrays = [jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
              for i, s in enumerate(specs[:5])]
    return arrays + [jnp.full(specs[5].shape, shape.ctx_len, jnp.int32)]


def main(argv=None) -> int:
    import sys

    from bench import wall

    return wall.run(argv, module=sys.modules[__name__], inputs=_inputs)



if __name__ == "__main__":
    raise SystemExit(main())
