"""Benchmark protocol of `pallas_ops.paged_attention` (the target model's ragged paged attention).

Catalogue shapes: `bench.shapes.PAGED_ATTENTION` (Llama-3.1-8B / Qwen3-8B attention: Hq=32,
Hkv=8, D=128, bf16; decode batch 8 and 64, verify 16 tokens x 8 sequences, contexts 1k-16k,
pages of 16 and 64; a mixed batch of 4 decoding, 3 verifying and 1 prefilling (256 tokens)
sequences at 4k).

- `build(shape, *, chip, interpret=False)`: (fn, args) with args as `jax.ShapeDtypeStruct`s; fn
  calls the kernel compiled (`interpret=False`, the default) with the chip's block sizes.
- `concrete_args(shape)`: random arrays for those args (identity page table).
- `hbm_bytes(shape)`: bytes the kernel must move: every page holding a sequence's keys, K and V,
  once (whole pages are DMA'd), q in and the output out.
- `flops(shape)`: the attention's matmul work, 4 * D flops per (q row, visible key, q head).
- `main_loop(shape, *, chip)`: for `python -m bench static`: one iteration = one KV block
  (kv_tokens keys of `kv_heads` heads, K and V) of one (q block, sequence) pair.
- `write_build`, `write_concrete_args`, `write_hbm_bytes`: the same for `write_kv_pages` at the
  same shapes (each sequence's q_len new tokens written at positions kv_len - q_len ..).

The wall-clock benchmarks are the pytest-benchmark suite `bench/micro/` (its README section).
"""
from __future__ import annotations

import functools

from bench import shapes as shapes_mod

KERNEL = "paged_attention"
CALL_NAME = "dflash_paged_attention"


def shapes() -> list:
    return list(shapes_mod.PAGED_ATTENTION)


def bf16_shapes() -> list:
    """The shapes with a bf16 cache: what kernels over jax's packed layout (ours as a drop-in,
    jax's, RPA v3's) run at; their 8-bit forms are not the per-(head, token) scales of ours."""
    return [s for s in shapes_mod.PAGED_ATTENTION if not s.cache_dtype]


def find(name: str):
    return shapes_mod.find(KERNEL, name)


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}[dtype]


def _kv_bytes_per_key(shape) -> int:
    """HBM bytes of one key of one KV head, K or V: the value row, plus its f32 scale for an
    8-bit cache."""
    if shape.cache_dtype is None:
        return shape.head_dim * _itemsize(shape.dtype)
    return shape.head_dim * _itemsize(shape.cache_dtype) + 4


def layout(shape) -> tuple[list[int], list[int]]:
    """(q_lens, kv_lens) per sequence. Mixed: 4 decode, 3 verify-16, 1 prefill chunk of q_len."""
    if shape.mixed:
        q_lens = [1] * 4 + [16] * 3 + [shape.q_len]
        q_lens = q_lens[: shape.num_seqs] + [1] * max(0, shape.num_seqs - len(q_lens))
        return q_lens, [shape.kv_len] * shape.num_seqs
    return [shape.q_len] * shape.num_seqs, [shape.kv_len] * shape.num_seqs


def block_sizes():
    """None (the chip's table entry), or env PALLAS_DFLASH_PA_BLOCKS="kv_tokens,kv_heads,q_tokens"
    (0 = automatic) for block-size sweeps with `python -m bench static`."""
    import os

    from pallas_ops.paged.block_sizes import PagedAttentionBlockSizes

    override = os.environ.get("PALLAS_DFLASH_PA_BLOCKS")
    if not override:
        return None
    kv_tokens, kv_heads, q_tokens = (int(x) for x in override.split(","))
    return PagedAttentionBlockSizes(kv_tokens=kv_tokens, kv_heads=kv_heads or None,
                                    q_tokens=q_tokens or None)


def resolved_block_sizes(shape, chip: str):
    from pallas_ops.paged.block_sizes import resolve

    q_lens, _ = layout(shape)
    from pallas_ops.paged.call import scale_page_align

    align = scale_page_align(shape.page_size) if shape.cache_dtype else 1
    return resolve(block_sizes(), chip=chip, num_tokens=sum(q_lens), max_seqs=shape.num_seqs,
                   num_kv_heads=shape.num_kv_heads,
                   group=shape.num_q_heads // shape.num_kv_heads, page_size=shape.page_size,
                   pages_per_seq=shape.pages_per_seq, page_align=align,
                   quantized=bool(shape.cache_dtype), head_dim=shape.head_dim)


def build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args): fn(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs[, k_scales,
    v_scales]) (the scales for an 8-bit `cache_dtype`, [Hkv, P, page_size] f32).
    interpret: the kernel's `interpret=` (False: compiled; None: the execution policy)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.paged import paged_attention

    dt = jnp.dtype(shape.dtype)
    q_lens, _ = layout(shape)
    t, s, pps = sum(q_lens), shape.num_seqs, shape.pages_per_seq
    hq, hkv, d, ps = shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.page_size
    S = jax.ShapeDtypeStruct
    kvt = jnp.dtype(shape.cache_dtype) if shape.cache_dtype else dt
    args = (S((t, hq, d), dt), S((hkv, s * pps, ps, d), kvt), S((hkv, s * pps, ps, d), kvt),
            S((s,), jnp.int32), S((s, pps), jnp.int32), S((s + 1,), jnp.int32),
            S((1,), jnp.int32))
    fn = functools.partial(paged_attention, interpret=interpret, chip=chip,
                           block_sizes=block_sizes())
    if shape.cache_dtype:
        scales = S((hkv, s * pps, ps), jnp.float32)
        plain = fn

        def fn(*a):
            return plain(*a[:7], k_scales=a[7], v_scales=a[8])

        args = args + (scales, scales)
    return fn, args


def concrete_args(shape, seed: int = 0):
    """Random q/pages, identity page table, the shape's lengths: arrays for the benchmarks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _, specs = build(shape)
    q_lens, kv_lens = layout(shape)
    key = jax.random.key(seed)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)
               for i, s in enumerate(specs[:3]))
    extra = ()
    if shape.cache_dtype:
        from pallas_ops.quant import quantize
        (k, ks), (v, vs) = (quantize(x, specs[1].dtype) for x in (k, v))
        extra = (ks, vs)
    q, k, v = q.astype(specs[0].dtype), k.astype(specs[1].dtype), v.astype(specs[2].dtype)
    table = jnp.arange(np.prod(specs[4].shape), dtype=jnp.int32).reshape(specs[4].shape)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return (q, k, v, jnp.asarray(kv_lens, jnp.int32), table, cu,
            jnp.asarray([shape.num_seqs], jnp.int32)) + extra


def hbm_bytes(shape) -> int:
    """Bytes that must move: each sequence's pages of K and V once (8-bit caches: values and their
    f32 scales), q in, output out. (An 8-bit cache's scales are also gathered along the page
    table by XLA before the kernel: not counted here, see `scale_gather_bytes`.)"""
    it = _itemsize(shape.dtype)
    q_lens, kv_lens = layout(shape)
    pages = sum(-(-kv // shape.page_size) for kv in kv_lens)
    kv = 2 * pages * shape.page_size * shape.num_kv_heads * _kv_bytes_per_key(shape)
    qo = 2 * sum(q_lens) * shape.num_q_heads * shape.head_dim * it
    return kv + qo


def scale_gather_bytes(shape) -> int:
    """8-bit caches: HBM bytes of the XLA gather that lays the scales out along each sequence's
    page table (read and write, K and V, every page-table slot); 0 for bf16 caches."""
    if not shape.cache_dtype:
        return 0
    slots = shape.num_seqs * shape.pages_per_seq * shape.page_size * shape.num_kv_heads
    return 2 * 2 * slots * 4


def flops(shape) -> int:
    """Matmul flops of the attention: 4 * D per (q row, causally visible key, q head) (q.K and
    p.V, a multiply and an add each)."""
    q_lens, kv_lens = layout(shape)
    keys = sum(q * kv - q * (q - 1) // 2 for q, kv in zip(q_lens, kv_lens))   # row i sees kv-q+i+1
    return 4 * keys * shape.num_q_heads * shape.head_dim


def write_build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args) for `write_kv_pages` at a paged-attention shape: fn(k_pages, v_pages, k_new,
    v_new, kv_lens, page_indices, cu_q_lens, num_seqs) -> (k_pages, v_pages), the q_len new
    tokens of each sequence written at positions kv_len - q_len .. kv_len - 1. Donate the pages
    (arguments 0 and 1) under jit: the kernel updates them in place. `chip` is unused (the
    kernel has no block-size table); kept for the protocol."""
    import jax

    from pallas_ops.paged import write_kv_pages

    del chip
    _, specs = build(shape)
    t = specs[0].shape[0]
    new = jax.ShapeDtypeStruct((t, shape.num_kv_heads, shape.head_dim), specs[0].dtype)
    args = (specs[1], specs[2], new, new) + specs[3:]
    fn = functools.partial(write_kv_pages, interpret=interpret)
    if shape.cache_dtype:   # 8-bit pages: fn(..., num_seqs, k_scales, v_scales), 4 results
        plain = fn

        def fn(*a):
            return plain(*a[:8], k_scales=a[8], v_scales=a[9])
    return fn, args


def write_concrete_args(shape, seed: int = 0):
    """Arrays for `write_build`'s fn: random pages and new rows, the attention's lengths/table."""
    import jax

    q, k, v, kv_lens, table, cu, num_seqs, *scales = concrete_args(shape, seed)
    _, specs = write_build(shape)
    key = jax.random.fold_in(jax.random.key(seed), 100)
    k_new, v_new = (jax.random.normal(jax.random.fold_in(key, i), specs[2].shape, specs[2].dtype)
                    for i in range(2))
    return (k, v, k_new, v_new, kv_lens, table, cu, num_seqs, *scales)


def write_hbm_bytes(shape) -> int:
    """Bytes `write_kv_pages` must move: every page receiving a new token read and written back,
    K and V (rows of a tiled HBM page cannot be DMA'd alone), and the new rows read once."""
    it = _itemsize(shape.dtype)
    q_lens, kv_lens = layout(shape)
    ps = shape.page_size
    pages = sum((kv - 1) // ps - (kv - q) // ps + 1 for q, kv in zip(q_lens, kv_lens) if q)
    page_bytes = shape.num_kv_heads * ps * shape.head_dim * (
        _itemsize(shape.cache_dtype) if shape.cache_dtype else it)
    scales = 2 * 2 * sum(q_lens) * shape.num_kv_heads * 4 if shape.cache_dtype else 0
    return (2 * 2 * pages * page_bytes + 2 * sum(q_lens) * shape.num_kv_heads * shape.head_dim * it
            + scales)


def kernel_steps(shape, chip: str, bs=None) -> tuple[int, int, int]:
    """(KV-block steps, grid steps, row sub-tile updates) of the whole call, following the
    kernel's work list (bs: its resolved block sizes, default `resolved_block_sizes`)."""
    from pallas_ops.chips import CHIPS

    bs = bs if bs is not None else resolved_block_sizes(shape, chip)
    q_lens, kv_lens = layout(shape)
    g = shape.num_q_heads // shape.num_kv_heads
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    nqb = -(-cu[-1] // bs.q_tokens)
    steps = subtiles = 0
    for qb in range(nqb):
        lo, hi = qb * bs.q_tokens, (qb + 1) * bs.q_tokens
        for s, kv in enumerate(kv_lens):
            if cu[s] < hi and cu[s + 1] > lo and cu[s + 1] > cu[s]:
                last_pos = kv - cu[s + 1] + min(cu[s + 1], hi) - 1
                blocks = -(-(last_pos // shape.page_size + 1) // bs.pages_per_block)
                r_lo, r_hi = (max(cu[s], lo) - lo) * g, (min(cu[s + 1], hi) - lo) * g
                steps += blocks
                subtiles += blocks * ((r_hi - 1) // bs.sub_rows - r_lo // bs.sub_rows + 1)
    head_groups = shape.num_kv_heads // bs.kv_heads
    cores = CHIPS[chip].tensorcores
    grid = head_groups * nqb
    grid += (-grid) % cores
    return steps * head_groups, grid, subtiles * head_groups


def main_loop(shape, *, chip: str = "v5p"):
    """The KV-block loop: one iteration DMAs kv_tokens keys of K and V for kv_heads heads."""
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS

    bs = resolved_block_sizes(shape, chip)
    iterations, grid_steps, subtiles = kernel_steps(shape, chip)
    # Hot path of a full interior block (the same branch structure with libtpu 0.0.42.1 and
    # 0.0.50.1, checked with `--loops` on v5p at pages of 16 and 64 and on the mixed batch): the next block's prefetch and its unrolled
    # page-DMA starts run (two branches not taken). Everything after is tail-block work the hot
    # path jumps over: the chunked tail DMA starts (one branch, plus one per chunk of >= 8 pages;
    # smaller chunks are predicated), and the V sanitising (one branch, one for the partial page,
    # one per zeroing chunk). A q tile taller than one matmul adds the loop over the row
    # sub-tiles a pair owns, behind its trip-count guard (not taken).
    ppb = bs.pages_per_block
    chunks = [1 << k for k in range(max(1, ppb - 1).bit_length())]
    skipped = 1 + sum(c >= 8 for c in chunks) + 2 + len(chunks)
    inner_trips = ()
    taken = (False, False) + (True,) * skipped
    if bs.sub_rows < bs.q_rows:
        inner_trips = (max(1, round(subtiles / iterations)),)
        taken += (False,)
    if shape.cache_dtype:
        # 8-bit blocks: the compiler's branch structure around the tail code (no per-page V
        # zeroing; the block's scale / V sanitising instead) varies with the pages per block
        # and the chip, so no hot path is declared: the static span (tail code included) is
        # the figure, an upper bound.
        taken = None
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=2 * bs.kv_heads * bs.kv_tokens * _kv_bytes_per_key(shape),
        iterations=iterations,
        cores=CHIPS[chip].tensorcores if grid_steps > 1 else 1,
        outer_iterations=grid_steps,
        inner_trips=inner_trips,
        taken_branches=taken,
    )


def packed_args(shape) -> tuple:
    """(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution) specs of a call over
    the packed cache [P, page_size, 2 Hkv / packing, packing, D] (tpu-inference's RPA v3 and
    tokamax's ragged paged attention take these)."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(shape.dtype)
    q_lens, _ = layout(shape)
    t, s, pps = sum(q_lens), shape.num_seqs, shape.pages_per_seq
    hq, hkv, d, ps = shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.page_size
    packing = 4 // dt.itemsize
    S = jax.ShapeDtypeStruct
    return (S((t, hq, d), dt), S((t, hkv, d), dt), S((t, hkv, d), dt),
            S((s * pps, ps, 2 * hkv // packing, packing, d), dt), S((s,), jnp.int32),
            S((s * pps,), jnp.int32), S((s + 1,), jnp.int32), S((3,), jnp.int32))
