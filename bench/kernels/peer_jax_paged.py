"""The peer: jax's bundled Pallas TPU paged attention, at the catalogue's decode shapes.

`jax.experimental.pallas.ops.tpu.paged_attention` of the installed jax (0.10.2 or 0.12.0.1: their
sources differ, see `main_loop`) is the kernel ours is measured against: same bench protocol as
`bench/kernels/NAME.py` (see CONTRIBUTING.md), so `python -m bench static` and the wall-clock
suite `bench/micro/` (on a TPU only: it has no interpreter mode) treat it like one of ours.

Its contract differs from ours: q is [B, Hq, D] (decode only, one query per sequence) and already
scaled by 1/sqrt(D); K/V pages are [Hkv, P, page_size, D]; `lengths` [B] int32;
`page_indices` [B, pages_per_seq] int32. It streams `pages_per_compute_block` pages per DMA'd block;
we use 128-token blocks (8 pages of 16 tokens, 2 of 64), the configuration the issue's target
(about 750 bundles per 128-token block at G=4, D=128 on v5p) was measured at.

Its main loop is the `fori_loop` over KV blocks inside each (core, sequence, kv head) grid step:
one iteration waits for the K and V pages of one block of one kv head, issues the next block's
DMAs, and does the online-softmax update. On a two-TensorCore chip (v5p) we run it with
`megacore_mode="batch"` (its best megacore split when B is even), elsewhere with None.
"""
from __future__ import annotations

import functools

import numpy as np

from bench.kernels import shape_finder
from bench import shapes as shapes_mod

KERNEL = "peer_jax_paged_attention"
# jax's pallas_call has no name=: the HLO custom call takes the name of the enclosing jit
# (`paged_attention`), with op_name "jit(paged_attention)/jit(paged_attention)/pallas_call".
CALL_NAME = "paged_attention"
BLOCK_TOKENS = 128


def shapes() -> list:
    """The catalogue shapes this peer runs at: paged-attention decode (q_len 1), not mixed."""
    return [s for s in shapes_mod.PAGED_ATTENTION if s.q_len == 1 and not s.mixed]


find = shape_finder(KERNEL, shapes)


def pages_per_compute_block(shape) -> int:
    if BLOCK_TOKENS % shape.page_size:
        raise ValueError(f"page_size {shape.page_size} does not divide {BLOCK_TOKENS}")
    return BLOCK_TOKENS // shape.page_size


def megacore_mode(shape, chip: str) -> str | None:
    from pallas_ops.chips import CHIPS

    if chip in CHIPS and CHIPS[chip].tensorcores == 2 and shape.num_seqs % 2 == 0:
        return "batch"
    return None


def _padded_pages_per_seq(shape) -> int:
    ppcb = pages_per_compute_block(shape)
    return -(-shape.pages_per_seq // ppcb) * ppcb


def build(shape, *, chip: str = "v5p"):
    """(fn, args) for `shape`: fn(q, k_pages, v_pages, lengths, page_indices) -> [B, Hq, D]."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    if shape.q_len != 1 or shape.mixed:
        raise ValueError(f"{KERNEL} is decode-only (q_len 1); shape {shape.name} has q_len {shape.q_len}")
    dtype = jnp.dtype(shape.dtype)
    b, hq, hkv, d = shape.num_seqs, shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    pps = _padded_pages_per_seq(shape)
    total_pages = b * pps
    args = (
        jax.ShapeDtypeStruct((b, hq, d), dtype),                                   # q (pre-scaled)
        jax.ShapeDtypeStruct((hkv, total_pages, shape.page_size, d), dtype),      # k_pages
        jax.ShapeDtypeStruct((hkv, total_pages, shape.page_size, d), dtype),      # v_pages
        jax.ShapeDtypeStruct((b,), jnp.int32),                                    # lengths
        jax.ShapeDtypeStruct((b, pps), jnp.int32),                                # page_indices
    )
    fn = functools.partial(paged_attention,
                           pages_per_compute_block=pages_per_compute_block(shape),
                           megacore_mode=megacore_mode(shape, chip))
    return fn, args


def hbm_bytes(shape) -> int:
    """Bytes the call must move: every valid key and value once, q in, o out, page table."""
    item = np.dtype(shape.dtype).itemsize if shape.dtype != "bfloat16" else 2
    kv = 2 * shape.num_seqs * shape.num_kv_heads * shape.kv_len * shape.head_dim * item
    qo = 2 * shape.num_seqs * shape.num_q_heads * shape.head_dim * item
    table = shape.num_seqs * (_padded_pages_per_seq(shape) + 1) * 4
    return kv + qo + table


def flops(shape) -> int:
    """Matmul flops of decode attention (the paged module's count at q_len 1)."""
    from bench.kernels import paged as paged_mod

    return paged_mod.flops(shape)


def main_loop(shape, *, chip: str = "v5p"):
    """The static-analysis protocol (see CONTRIBUTING.md): the block loop and its HBM bytes.

    The hot path depends on the libtpu version, and with it on jax's version (the kernel is
    jax's: jax 0.12 rewrote its page DMAs, one wait per block instead of one per page, and runs
    the block body unconditionally in the fori_loop variant). Forward branches of the block loop,
    in `--loops` order (checked on v5p at pages of 16 and 64):
    - libtpu 0.0.42.1 (jax 0.10.2): the `pl.when(i * bk < length)` around the block body (runs),
      the next-block index computation's conds (advance to the next kv head / sequence: four
      branches, one the guard of the zero-length-skipping fori_loop), the `i == 0` init (13
      bundles). The first-block and next-block prefetches are predicated, not branched: they
      cost their bundles every iteration.
    - libtpu 0.0.50.1 (jax 0.12.0.1): the same four index-computation branches, then at 8 pages
      per block (p16) the first-block prefetch (`pl.when(init_flag)`, about 260 bundles: runs
      once per call, so the hot path jumps over it) and the next-block prefetch (runs); at 2 pages
      per block (p64) both prefetches are predicated.
    Everything else is counted as in the static span, as for 0.0.42.1: the index-computation
    conds (and with 0.0.42.1 the init) count although an interior block skips them, a
    conservative overcount against this peer (at p16: 49 bundles with 0.0.42.1, 762 against 713;
    36 with 0.0.50.1, 412 against 376), and the nested loop once.
    """
    from bench.static import MainLoop
    from bench.static import parse as static_parse

    item = 2 if shape.dtype == "bfloat16" else np.dtype(shape.dtype).itemsize
    blocks = -(-shape.kv_len // BLOCK_TOKENS)
    mode = megacore_mode(shape, chip)
    taken = None
    if static_parse.dump_format().libtpu == "0.0.50.1" and pages_per_compute_block(shape) > 2:
        taken = (False, False, False, False, True, False)
    return MainLoop(
        call_name=CALL_NAME,
        # K and V of one 128-token block of one kv head (whole pages are DMA'd).
        bytes_per_iteration=2 * BLOCK_TOKENS * shape.head_dim * item,
        iterations=shape.num_seqs * shape.num_kv_heads * blocks,
        cores=2 if mode is not None else 1,
        outer_iterations=shape.num_seqs * shape.num_kv_heads,   # grid steps (sequence, kv head)
        # The one nested loop (skipping zero-length sequences when moving to the next one) sits
        # in a branch most iterations jump over: counted once, as in the static span.
        inner_trips=(1,),
        taken_branches=taken,
    )


def concrete_args(shape, seed: int = 0):
    """Random q (unscaled: the peer takes q pre-scaled, any values do) and pages, full lengths,
    identity page table."""
    import jax
    import jax.numpy as jnp

    _, specs = build(shape)
    key = jax.random.key(seed)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), s.shape, s.dtype)
               for i, s in enumerate(specs[:3]))
    lengths = jnp.full(specs[3].shape, shape.kv_len, jnp.int32)
    table = jnp.arange(np.prod(specs[4].shape), dtype=jnp.int32).reshape(specs[4].shape)
    return q, k, v, lengths, table
