"""Benchmark protocol of `pallas_ops.verify_accept` (fused verify/accept from target logits).

Catalogue shapes: `bench.shapes.VERIFY_ACCEPT` (Qwen3 B=64 bs=16 V=151936 and Llama-3.1 B=1
bs=10 V=128256, bf16, greedy and sampling).

- `build(shape, *, chip, interpret=False)`: the compiled-mode call (the default) with the chip's
  block sizes; `concrete_args(shape)`: random logits with every draft accepted (the worst case).
- `hbm_bytes(shape)`: the one-read floor B x bs x V x itemsize (plus draft_probs when a shape
  has them; the catalogue's do not).
- `main_loop(shape, *, chip)`: for `python -m bench static`. One iteration = one sequence of one
  vocab tile (bs x vocab_tile logits), the `fori_loop` over the block's sequences; the 128-lane
  chunk loop nested in it runs nchunks / unroll times.

The wall-clock benchmarks are the pytest-benchmark suite `bench/micro/` (its README section).
"""
from __future__ import annotations

import functools
import os

from bench import shapes as shapes_mod

KERNEL = "verify_accept"
CALL_NAME = "verify_accept"


def shapes() -> list:
    return list(shapes_mod.VERIFY_ACCEPT)


def find(name: str):
    return shapes_mod.find(KERNEL, name)


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4}[dtype]


def block_sizes(shape, chip: str):
    """The table's sizes for `shape` on `chip`; env PALLAS_DFLASH_VA_BLOCKS="seqs,vocab_tile"
    overrides them (for sweeps with `python -m bench static`)."""
    from pallas_ops.verify.block_sizes import VerifyAcceptBlockSizes, default_block_sizes

    override = os.environ.get("PALLAS_DFLASH_VA_BLOCKS")
    if override:
        bb, tv = (int(x) for x in override.split(","))
        return VerifyAcceptBlockSizes(bb, tv)
    return default_block_sizes(shape.batch, shape.block_size, shape.vocab,
                               _itemsize(shape.dtype), chip)


def build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args): fn(logits, draft_tokens[, temperature, seed, position]) compiled for `chip`
    (interpret: the kernel's `interpret=`; None selects the execution policy)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.verify import verify_accept

    B, bs, V = shape.batch, shape.block_size, shape.vocab
    S = jax.ShapeDtypeStruct
    args = [S((B, bs, V), jnp.dtype(shape.dtype)), S((B, bs - 1), jnp.int32)]
    fn = functools.partial(verify_accept, interpret=interpret, chip=chip,
                           block_sizes=block_sizes(shape, chip))
    if shape.sampling:
        args += [S((B,), jnp.float32), S((B,), jnp.int32), S((B,), jnp.int32)]

        def sampled(logits, drafts, temperature, seed, position):
            return fn(logits, drafts, temperature=temperature, seed=seed, position=position)

        return sampled, tuple(args)
    return fn, tuple(args)


def hbm_bytes(shape) -> int:
    """The one-read floor: B x bs x V x itemsize (+ draft_probs when the shape has them)."""
    n = shape.batch * shape.block_size * shape.vocab
    it = _itemsize(shape.dtype)
    q = getattr(shape, "draft_probs", False)
    return n * it + (shape.batch * (shape.block_size - 1) * shape.vocab * it if q else 0)


def main_loop(shape, *, chip: str = "v5p"):
    """One iteration = one grid step: seqs_per_block sequences x bs rows x vocab_tile logits.

    The hot path (an interior vocab tile of a live block) is declared for `bench.static`: the
    grid loop's forward branches are, in order, [next logits tile DMA (runs), row-input DMA
    (skipped: same block), live-block guard (runs), init at tile 0 (skipped), unmasked body
    (runs), {sampling: per-sequence sampling branch (runs), greedy branch (skipped)}, masked
    tail body (skipped), {sampling: its two inner branches}, finalize (skipped)]; nested loops:
    the sequence loop (seqs_per_block trips, absent when it is 1) and the 128-lane chunk loop
    (vocab_tile / 1024 trips), then the masked copies (not run). The same structure with libtpu
    0.0.42.1 and 0.0.50.1 (checked with `--loops`), and with the vocabulary split over the two
    TensorCores at batch 1 (`vocab_splits`: the grid loop is one loop over the three axes; its
    per-row statistics are merged by a few XLA ops on [B, bs] after the call, not counted)."""
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS
    from pallas_ops.verify.kernel import _chunk_unroll

    bsz = block_sizes(shape, chip)
    B, bs, V = shape.batch, shape.block_size, shape.vocab
    bb, tv = bsz.seqs_per_block, bsz.vocab_tile
    tiles = -(-V // tv)
    splits = bsz.splits(V)      # a leading parallel axis over vocabulary halves
    per_split = -(-tiles // splits)
    nchunks = tv // 128
    groups = nchunks // _chunk_unroll(nchunks)
    seq = (bb,) if bb > 1 else ()
    if shape.sampling:
        trips = seq + (groups, 0) + seq + (0, 0) if bb > 1 else (groups, 0, 0, 0)
        taken = (False, True, False, True, False, False, True, True, False, False, True)
    else:
        trips = seq + (groups,) + ((0, 0) if bb > 1 else (0,))
        taken = (False, True, False, True, False, True, True)
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=bb * bs * tv * _itemsize(shape.dtype),
        iterations=splits * (B // bb) * per_split,
        cores=min(CHIPS[chip].tensorcores, splits * (B // bb)),
        loop_depth=1,
        inner_trips=trips,
        taken_branches=taken,
    )


def concrete_args(shape, seed: int = 0):
    """Random logits (normal x 3) and drafts equal to their argmax: every draft accepted, the
    worst case; sampling shapes add temperature 0.8, seed b and position 1000."""
    import jax
    import jax.numpy as jnp

    _, specs = build(shape)
    logits = jax.random.normal(jax.random.key(seed), specs[0].shape, specs[0].dtype) * 3
    drafts = jnp.argmax(logits[:, :-1], -1).astype(jnp.int32)
    out = (logits, drafts)
    if shape.sampling:
        B = shape.batch
        out += (jnp.full((B,), 0.8, jnp.float32), jnp.arange(B, dtype=jnp.int32),
                jnp.full((B,), 1000, jnp.int32))
    return out
