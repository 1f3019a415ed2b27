"""Block sizes of `block_attention`: a frozen dataclass, a per-generation table and a fallback.

ctx_tile:          context rows per streamed tile (per KV head). It is the lane dimension of the
                   score tile [rows, ctx_tile], so a multiple of 128. One tile's K and V of every
                   KV head of a grid step move in one DMA each.
kv_heads_per_step: KV heads handled by one grid step (all of their q heads packed into matmul
                   rows). Fewer heads per step give more parallel grid steps (v5p has two
                   TensorCores per device); more heads give larger DMAs. Clamped at run time to
                   the largest divisor of Hkv not above it.
"""
from __future__ import annotations

import dataclasses

from pallas_ops.chips import current_chip


@dataclasses.dataclass(frozen=True)
class BlockAttentionBlockSizes:
    ctx_tile: int = 1024
    kv_heads_per_step: int = 8

    def __post_init__(self):
        if not isinstance(self.ctx_tile, int) or self.ctx_tile < 128 or self.ctx_tile % 128:
            raise ValueError(f"ctx_tile must be a positive multiple of 128, got {self.ctx_tile!r}")
        if not isinstance(self.kv_heads_per_step, int) or self.kv_heads_per_step < 1:
            raise ValueError(f"kv_heads_per_step must be an int >= 1, got "
                             f"{self.kv_heads_per_step!r}")

    def heads_per_step(self, num_kv_heads: int, *, pairs: bool = False) -> int:
        """The largest divisor of num_kv_heads that is <= kv_heads_per_step.

        pairs: head blocks must start at an even head (bf16 scales of a quantized cache pack two
        heads per 32-bit word in HBM, and a DMA moves whole words): an odd divisor below
        num_kv_heads is replaced by the next larger divisor that is even or num_kv_heads."""
        hb = min(self.kv_heads_per_step, num_kv_heads)
        while num_kv_heads % hb:
            hb -= 1
        if pairs:
            while hb % 2 and hb != num_kv_heads:
                hb += 1
                while num_kv_heads % hb:
                    hb += 1
        return hb


# One entry per generation, from `python -m bench static --kernel block_attention` (libtpu
# 0.0.42.1, jax 0.10.2; 0.0.50.1 schedules about 2% fewer bundles per tile) at the drafter shapes
# (Hq=32, Hkv=8, D=128, bf16, bs 16 and 10). Per-tile issue cost has a fixed part per KV head
# (online-softmax bookkeeping, MXU latency), so longer tiles amortise it: v5p, 4 heads x 1024
# rows: ~1790 bundles per tile vs ~2655 HBM cycles for its 2 MiB of K+V (bs=16, B=1; at
# `pallas_ops.chips.CHIPS`'s 790 B/cycle per TensorCore); 512-row tiles were at 0.94x of HBM time,
# 256-row tiles issue-bound (1.4x). v5p has two TensorCores per device, so 4 KV heads per step
# gives two parallel head groups even at batch 1. v5e/v6e: one TensorCore; 8 heads per step halves
# the grid steps.
TABLE: dict[str, BlockAttentionBlockSizes] = {
    "v5e": BlockAttentionBlockSizes(ctx_tile=1024, kv_heads_per_step=8),
    "v5p": BlockAttentionBlockSizes(ctx_tile=1024, kv_heads_per_step=4),
    "v6e": BlockAttentionBlockSizes(ctx_tile=1024, kv_heads_per_step=8),
}
FALLBACK = BlockAttentionBlockSizes(ctx_tile=1024, kv_heads_per_step=4)


def get_block_sizes(chip: str | None = None) -> BlockAttentionBlockSizes:
    """The table entry for `chip` (default: the current chip), else the fallback."""
    if chip is None:
        chip = current_chip()
    return TABLE.get(chip, FALLBACK) if chip is not None else FALLBACK
