"""Block sizes of the paged attention kernel: a frozen dataclass, a per-generation table, a fallback.

Three knobs:
- `kv_tokens`: keys per compute block (a multiple of the page size; the block's pages are DMA'd
  together, one DMA per page covering all KV heads of the block). Large blocks amortise the
  per-block work (DMA issue, waits, softmax bookkeeping) over many HBM bytes.
- `kv_heads`: KV heads handled by one grid step (divides Hkv). Default: all of them (one DMA per
  page moves every head), or half on a megacore chip (v5p: two TensorCores behind one device)
  when there is a single q block, so the parallel grid axis still has two entries.
- `q_tokens`: q tokens per grid step (rows of the packed q tile = q_tokens * G). A sequence whose
  q rows span two q blocks is read twice, so verify wants q_tokens >= the verify length; decode
  wants few rows per block (every pair of (q block, sequence) computes all the block's rows and
  masks the foreign ones). `None` lets the wrapper choose from the shapes (see `resolve`).
"""
from __future__ import annotations

import dataclasses

from pallas_ops.chips import CHIPS, current_chip


@dataclasses.dataclass(frozen=True)
class PagedAttentionBlockSizes:
    kv_tokens: int = 512
    kv_heads: int | None = None      # None: all KV heads (half on megacore with one q block)
    q_tokens: int | None = None      # None: chosen from the call's shapes

    def __post_init__(self):
        if not isinstance(self.kv_tokens, int) or self.kv_tokens < 16 or self.kv_tokens % 16:
            raise ValueError(f"kv_tokens must be a positive multiple of 16, got {self.kv_tokens!r}")
        if self.kv_heads is not None and (not isinstance(self.kv_heads, int) or self.kv_heads < 1):
            raise ValueError(f"kv_heads must be a positive int or None, got {self.kv_heads!r}")
        if self.q_tokens is not None and (not isinstance(self.q_tokens, int) or self.q_tokens < 1):
            raise ValueError(f"q_tokens must be a positive int or None, got {self.q_tokens!r}")


@dataclasses.dataclass(frozen=True)
class ResolvedBlockSizes:
    """Concrete block sizes for one call (all static)."""
    pages_per_block: int
    kv_tokens: int            # pages_per_block * page_size
    kv_heads: int
    q_tokens: int
    q_rows: int               # q_tokens * G
    sub_rows: int             # rows per matmul: a pair computes only the sub-tiles it owns


# Per generation: the table's defaults (kv_heads / q_tokens resolved per call in `resolve`).
# Chosen from libtpu's static schedule (`python -m bench static --kernel paged_attention`, jax
# 0.10.2) at Llama-3.1-8B shapes, bundles per KV block / HBM cycles of that block:
#   v5p  512 keys: decode-b64-4k-p16 0.61, verify16-b8-4k-p16 0.87, mixed 1.62 (issue-bound)
#        1024 keys: decode 0.51, verify 0.68, mixed 1.22 (9.4 MiB VMEM of 64)
#   v6e  512 keys: decode 0.70, verify 0.89; 1024 keys: verify-1k-p64 0.68, decode-b8 0.59
#   v5e  512 keys: decode 0.42, verify 0.61 (slow HBM: already far below 1)
TABLE: dict[str, PagedAttentionBlockSizes] = {
    "v5e": PagedAttentionBlockSizes(kv_tokens=512),
    "v5p": PagedAttentionBlockSizes(kv_tokens=1024),
    "v6e": PagedAttentionBlockSizes(kv_tokens=1024),
}
FALLBACK = PagedAttentionBlockSizes(kv_tokens=512)
# 8-bit caches (int8 / fp8 pages with per-token scales): widening K and V in VMEM makes a KV block
# VALU-bound, so larger blocks amortise the per-block work. v5p, int8, bundles / HBM cycles
# (`python -m bench static --kernel paged --shape decode-b64-ctx4096-p64-int8`, libtpu 0.0.50.1):
#   1024 keys: decode-b64-4k-p64 1.25, verify16-b8-4k-p64 1.63; 2048: 1.07 / 1.43; 4096: 1.03 /
#   1.35 (one block per 4k sequence: no better per byte). v6e 2048: 1.05 / 1.38; v5e 2048: 0.70
#   (HBM-bound) / 1.09.
QUANTIZED_TABLE: dict[str, PagedAttentionBlockSizes] = {
    "v5e": PagedAttentionBlockSizes(kv_tokens=2048),
    "v5p": PagedAttentionBlockSizes(kv_tokens=2048),
    "v6e": PagedAttentionBlockSizes(kv_tokens=2048),
}
QUANTIZED_FALLBACK = PagedAttentionBlockSizes(kv_tokens=2048)

# Upper bound on the rows of the packed q tile (q_tokens * G) when q_tokens is chosen here.
MAX_Q_ROWS = 256
# Rows of one matmul when the q tile is taller: a (q block, sequence) pair computes only the
# sub-tiles holding its rows.
SUB_ROWS = 64


def default_block_sizes(chip: str | None = None, *, quantized: bool = False
                        ) -> PagedAttentionBlockSizes:
    """The table entry for `chip` (default: the current TPU generation), else the fallback;
    quantized: the table of 8-bit caches."""
    chip = chip if chip is not None else current_chip()
    table, fallback = (QUANTIZED_TABLE, QUANTIZED_FALLBACK) if quantized else (TABLE, FALLBACK)
    return table.get(chip, fallback) if chip is not None else fallback


def _pow2_ceil(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def resolve(block_sizes: PagedAttentionBlockSizes | None, *, chip: str | None, num_tokens: int,
            max_seqs: int, num_kv_heads: int, group: int, page_size: int,
            pages_per_seq: int, head_align: int = 1, page_align: int = 1,
            quantized: bool = False, head_dim: int = 128) -> ResolvedBlockSizes:
    """Turns (possibly partial) block sizes into concrete ones for a call; ValueError if invalid.

    head_align: KV heads per grid step must be a multiple of it or all of them (the interleaved
    layout passes Hkv: a step reads whole pages, every head). When that forbids halving the
    heads for a megacore chip, an automatic q_tokens is halved instead, so the parallel grid
    axis still has two entries.
    page_align: a KV block that is not a sequence's whole page table holds a multiple of it
    pages (8-bit caches: their scales are DMA'd in whole 128-key lane granules).
    quantized: an 8-bit cache (its own default table).
    head_dim: with the table's kv_tokens (block_sizes None) a decode-like call at head_dim < 128
    takes 128 / head_dim times the keys per block: the per-key softmax work does not shrink
    with D, so the same bytes per block keep it HBM-bound (v5p, D = 64, decode-b64-ctx4096-p16:
    2949 bundles per 1024-key block, issue 1.11x; 2048 keys: 0.96x).
    """
    scale_keys = 1
    if block_sizes is None:
        block_sizes = default_block_sizes(chip, quantized=quantized)
        if not quantized and head_dim < 128 and num_tokens <= max_seqs:
            scale_keys = max(1, 128 // head_dim)
    if not isinstance(block_sizes, PagedAttentionBlockSizes):
        raise ValueError(f"block_sizes must be a PagedAttentionBlockSizes or None, got "
                         f"{type(block_sizes).__name__}")
    chip = chip if chip is not None else current_chip()
    megacore = chip is not None and CHIPS[chip].tensorcores > 1
    if chip is None:
        megacore = True  # unknown target: keep two grid entries along the parallel axis

    # KV block: whole pages, no more than one sequence can use.
    pages_per_block = max(1, block_sizes.kv_tokens * scale_keys // page_size)
    if pages_per_block < pages_per_seq:
        pages_per_block = max(page_align, pages_per_block // page_align * page_align)
    pages_per_block = min(pages_per_block, pages_per_seq)

    if block_sizes.q_tokens is None:
        if num_tokens <= max_seqs:          # decode-like: about one token per sequence
            q_tokens = max(1, 32 // group)
        else:                               # verify / prefill: cover a whole verify block
            q_tokens = _pow2_ceil(-(-num_tokens // max_seqs))
            q_tokens = max(16, min(q_tokens, MAX_Q_ROWS // group))
        q_tokens = max(q_tokens, 8 // group if group < 8 else 1)
    else:
        q_tokens = block_sizes.q_tokens
    if (q_tokens * group) % 8:
        raise ValueError(f"block_sizes.q_tokens={q_tokens} times G={group} must be a multiple of 8")

    # KV heads per grid step: all of them (one DMA per page then moves every head: fewest DMA
    # descriptors per byte), unless that leaves a megacore chip a single grid step.
    def aligned(h):
        return h == num_kv_heads or h % head_align == 0

    if block_sizes.kv_heads is None:
        single_step = -(-num_tokens // q_tokens) < 2
        kv_heads = num_kv_heads
        if megacore and single_step and num_kv_heads % 2 == 0 and aligned(num_kv_heads // 2):
            kv_heads = num_kv_heads // 2
        elif megacore and single_step and block_sizes.q_tokens is None and num_tokens > 1:
            half = _pow2_ceil(-(-num_tokens // 2))       # two q blocks instead
            if (half * group) % 8 == 0:
                q_tokens = half
    else:
        kv_heads = block_sizes.kv_heads
    if num_kv_heads % kv_heads:
        raise ValueError(f"block_sizes.kv_heads={kv_heads} must divide the {num_kv_heads} KV heads")
    if not aligned(kv_heads):
        raise ValueError(f"block_sizes.kv_heads={kv_heads} must be a multiple of {head_align} "
                         f"or all {num_kv_heads} KV heads")
    q_rows = q_tokens * group
    sub_rows = SUB_ROWS if (q_rows > SUB_ROWS and q_rows % SUB_ROWS == 0) else q_rows
    return ResolvedBlockSizes(pages_per_block, pages_per_block * page_size, kv_heads, q_tokens,
                              q_rows, sub_rows)
