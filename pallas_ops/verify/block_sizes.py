"""Block sizes of the verify/accept kernel: a frozen dataclass, a per-generation table, a fallback.

A grid step covers `seqs_per_block` sequences x all bs rows x `vocab_tile` vocabulary entries.
The table gives, per chip, the target bytes of logits per grid step (large enough to hide the
~0.35 us per-step overhead behind the DMA, small enough to double-buffer well inside VMEM) and the
cap on sequences per step; `default_block_sizes` turns it into concrete sizes for a shape.
"""
from __future__ import annotations

import dataclasses

from pallas_ops.chips import CHIPS, current_chip

LANES = 128


@dataclasses.dataclass(frozen=True)
class VerifyAcceptBlockSizes:
    """seqs_per_block: sequences per grid step (leading dim of the logits block);
    vocab_tile: vocabulary entries per grid step, a multiple of 128 (the tail tile is masked);
    vocab_splits: contiguous runs of vocabulary tiles on a leading "parallel" grid axis, merged
    after the kernel (1 or 2). On a megacore chip (v5p) a batch of one sequence block would
    leave one TensorCore idle; split in two, each core reads half of every row."""

    seqs_per_block: int
    vocab_tile: int
    vocab_splits: int = 1

    def splits(self, V: int) -> int:
        """The vocabulary splits a V-entry row gets: no more than it has tiles."""
        return min(self.vocab_splits, -(-V // self.vocab_tile))

    def __post_init__(self):
        if self.vocab_splits not in (1, 2):
            raise ValueError(f"vocab_splits must be 1 or 2, got {self.vocab_splits!r}")
        if not isinstance(self.seqs_per_block, int) or self.seqs_per_block < 1:
            raise ValueError(f"seqs_per_block must be a positive int, got {self.seqs_per_block!r}")
        if (not isinstance(self.vocab_tile, int) or self.vocab_tile < LANES
                or self.vocab_tile % LANES):
            raise ValueError(f"vocab_tile must be a positive multiple of {LANES}, "
                             f"got {self.vocab_tile!r}")


@dataclasses.dataclass(frozen=True)
class _ChipTuning:
    step_bytes: int        # target bytes of logits per grid step
    max_seqs: int          # cap on seqs_per_block
    max_tile: int          # cap on vocab_tile


# Chosen from the v5p bundle dumps (`python -m bench static --kernel verify_accept`, sweeping
# PALLAS_DFLASH_VA_BLOCKS): the greedy 128-lane fold costs ~27 bundles per 8 chunks of a 16-row
# bf16 sequence (0.65x that data's HBM time) plus ~11 per sequence and ~200 per grid step; at
# 1 MiB per step the fixed costs bring it to ~0.9x the HBM time, at 2 MiB to ~0.76x. A batch
# of one sequence block on v5p splits the vocabulary over the two TensorCores (vocab_splits).
TUNING: dict[str, _ChipTuning] = {
    "v5e": _ChipTuning(step_bytes=2 << 20, max_seqs=8, max_tile=32768),
    "v5p": _ChipTuning(step_bytes=2 << 20, max_seqs=8, max_tile=32768),
    "v6e": _ChipTuning(step_bytes=2 << 20, max_seqs=8, max_tile=32768),
}
FALLBACK = _ChipTuning(step_bytes=2 << 20, max_seqs=8, max_tile=32768)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_block_sizes(B: int, bs: int, V: int, itemsize: int,
                        chip: str | None = None) -> VerifyAcceptBlockSizes:
    """Block sizes for logits [B, bs, V] of `itemsize` bytes on `chip` (None: current chip)."""
    if chip is None:
        chip = current_chip()
    tune = TUNING.get(chip, FALLBACK) if chip is not None else FALLBACK
    # Largest divisor of B not above the cap: no partial sequence blocks. On a megacore chip
    # (v5p: two TensorCores share the "parallel" sequence-block axis) keep >= 2 blocks.
    cap = min(B, tune.max_seqs)
    if chip in CHIPS and CHIPS[chip].tensorcores > 1 and B > 1:
        cap = min(cap, B // 2)
    bb = max(d for d in range(1, cap + 1) if B % d == 0)
    sub = 16 if itemsize == 2 else 8
    row_bytes = bb * _round_up(bs, sub) * itemsize
    tile = max(LANES, (tune.step_bytes // row_bytes) // LANES * LANES)
    tile = min(tile, tune.max_tile, _round_up(V, LANES))
    # Even out the tiles so the last one is not a sliver; keep whole groups of 8 chunks of 128
    # lanes (the kernel's unrolled inner loop) when the tile is large enough.
    n = -(-V // tile)
    cores = CHIPS[chip].tensorcores if chip in CHIPS else 1
    splits = 2 if cores > 1 and B // bb < cores else 1
    if splits > 1:   # an even number of tiles: both cores read the same bytes
        n = max(2, _round_up(n, 2))
    per = -(-V // n)
    tile = _round_up(per, 8 * LANES if tile >= 8 * LANES and per >= 8 * LANES else LANES)
    if splits > 1 and -(-V // tile) < 2:
        splits = 1
    return VerifyAcceptBlockSizes(bb, tile, splits)


__all__ = ["VerifyAcceptBlockSizes", "default_block_sizes", "TUNING", "CHIPS"]
