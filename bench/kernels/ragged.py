"""Benchmark protocol of `pallas_ops.ragged_paged_attention` (jax's signature and interleaved
cache layout, our paged kernel) at the paged-attention catalogue shapes.

Same shapes, batch layout, HBM bytes and flops as `bench.kernels.paged` (the same attention,
the same keys); only the cache layout differs: kv_pages [P, page_size, 2 * Hkv, D], K of KV
head h at combined head 2h, V at 2h + 1. Called as a switching project calls it: jax's
arguments, no block sizes (`num_kv_pages_per_block` / `num_queries_per_block` None: our table),
sm_scale = 1/sqrt(D) given explicitly (jax's default is 1.0).

- `build(shape, *, chip, interpret=False)`, `concrete_args(shape)`, `hbm_bytes`, `flops`.
- `main_loop(shape, *, chip)`: one iteration = one KV block (kv_tokens keys of every KV head,
  K and V) of one (q block, sequence) pair, as for `paged`.
"""
from __future__ import annotations

import functools

from bench.kernels import paged as paged_mod

KERNEL = "ragged_paged_attention"
CALL_NAME = "dflash_ragged_paged_attention"

shapes = paged_mod.bf16_shapes
find = paged_mod.find
layout = paged_mod.layout
hbm_bytes = paged_mod.hbm_bytes
flops = paged_mod.flops


def resolved_block_sizes(shape, chip: str):
    """The block sizes `ragged_paged_attention` resolves at `shape` on `chip`."""
    from pallas_ops.paged.block_sizes import resolve
    from pallas_ops.paged.ragged import kv_row_bytes, ragged_block_sizes

    q_lens, _ = layout(shape)
    g = shape.num_q_heads // shape.num_kv_heads
    wanted = ragged_block_sizes(num_kv_pages_per_block=None, num_queries_per_block=None,
                                page_size=shape.page_size, group=g, chip=chip,
                                kv_row_bytes=kv_row_bytes(shape.dtype, shape.num_kv_heads,
                                                          shape.head_dim))
    return resolve(wanted, chip=chip, num_tokens=sum(q_lens), max_seqs=shape.num_seqs,
                   num_kv_heads=shape.num_kv_heads, group=g, page_size=shape.page_size,
                   pages_per_seq=shape.pages_per_seq, head_align=shape.num_kv_heads)


def specs(shape):
    """jax's argument order and cache layout as `jax.ShapeDtypeStruct`s: q [T, Hq, D], kv_pages
    [P, page_size, 2 Hkv, D], kv_lens [S], page_indices [S, pps], cu_q_lens [S + 1], num_seqs [1]
    (shared with bench/kernels/peer_jax_ragged.py)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(shape.dtype)
    q_lens, _ = layout(shape)
    t, s, pps = sum(q_lens), shape.num_seqs, shape.pages_per_seq
    hq, hkv, d, ps = shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.page_size
    S = jax.ShapeDtypeStruct
    return (S((t, hq, d), dt), S((s * pps, ps, 2 * hkv, d), dt), S((s,), jnp.int32),
            S((s, pps), jnp.int32), S((s + 1,), jnp.int32), S((1,), jnp.int32))


def build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args): fn(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs), jax's order.
    interpret: the kernel's `interpret=` (False: compiled; None: the execution policy)."""
    from pallas_ops import ragged_paged_attention

    fn = functools.partial(ragged_paged_attention, sm_scale=shape.head_dim ** -0.5, chip=chip,
                           interpret=interpret)
    return fn, specs(shape)


def concrete_args(shape, seed: int = 0):
    """`paged.concrete_args`'s arrays with the cache interleaved (K at 2h, V at 2h + 1)."""
    import jax.numpy as jnp

    q, k, v, kv_lens, table, cu, num_seqs = paged_mod.concrete_args(shape, seed)
    kv = jnp.stack([k, v], axis=3)                            # [Hkv, P, ps, 2, D]
    hkv, p, ps, _, d = kv.shape
    kv = jnp.transpose(kv, (1, 2, 0, 3, 4)).reshape(p, ps, 2 * hkv, d)
    return q, kv, kv_lens, table, cu, num_seqs


# Hot-path branch structure of the KV-block loop by pages per block (checked with `--loops` on
# v5p at pages of 16 and 64 with libtpu 0.0.42.1 and 0.0.50.1, on v5e at both with 0.0.50.1):
# (is the full block's unrolled page-DMA start a branch, how many tail chunks of pages are
# branches rather than predicated). One DMA per page (the split layout issues two) moves the
# compiler's branch-or-predicate choices.
_BRANCHES = {8: (False, 0), 16: (True, 0), 32: (True, 2), 64: (True, 3)}


def main_loop(shape, *, chip: str = "v5p"):
    """The KV-block loop, as `paged.main_loop` (the same body): the next block's prefetch (and
    its full-block DMA starts) run, the tail-block work (chunked DMA starts, the V / K zeroing)
    is jumped over; a q tile taller than one matmul adds the sub-tile loop behind its guard."""
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS

    bs = resolved_block_sizes(shape, chip)
    iterations, grid_steps, subtiles = paged_mod.kernel_steps(shape, chip, bs)
    ppb = bs.pages_per_block
    chunks = [1 << k for k in range(max(1, ppb - 1).bit_length())]
    taken, inner_trips = None, ()
    if ppb in _BRANCHES:
        full_block_branch, tail_chunk_branches = _BRANCHES[ppb]
        taken = (False,) + (False,) * full_block_branch
        taken += (True,) * (1 + tail_chunk_branches + 2 + len(chunks))
    if bs.sub_rows < bs.q_rows:
        inner_trips = (max(1, round(subtiles / iterations)),)
        taken = None if taken is None else taken + (False,)
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=2 * bs.kv_heads * bs.kv_tokens * shape.head_dim
        * paged_mod._itemsize(shape.dtype),
        iterations=iterations,
        cores=CHIPS[chip].tensorcores if grid_steps > 1 else 1,
        outer_iterations=grid_steps,
        inner_trips=inner_trips,
        taken_branches=taken,
    )
