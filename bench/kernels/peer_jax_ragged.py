"""The peer: jax's bundled `ragged_paged_attention` (Pallas TPU), at the paged-attention shapes.

`jax.experimental.pallas.ops.tpu.ragged_paged_attention` of the installed jax (0.10.2 and
0.12.0.1 ship the same kernel source): the kernel `pallas_ops.ragged_paged_attention` replaces,
so `python -m bench static` puts the two side by side (`bench.kernels.ragged`: same arguments,
same interleaved cache, kv_pages [P, page_size, 2 * Hkv, D]).

Block sizes as its users get them: the call passes none, so jax takes them from its tuned table
(`tuned_block_sizes.get_tuned_block_sizes`, keyed by the device name) for the target chip. That
lookup reads `jax.devices()`, which is a CPU here, so `block_sizes` runs jax's own lookup with
the target's generation and device name ('TPU v5' for v5e and v5p, 'TPU v6' for v6e) and passes
its answer explicitly. None of the catalogue shapes is in the table (it starts at 512 batched
tokens): they all get its default, 128 pages and 32 queries per block, clamped to the pages per
sequence and the tokens. jax's head block: all 8 KV heads (16 combined bf16 rows). Its grid is
(head blocks, q blocks), both "arbitrary": one TensorCore on v5p. vmem_limit_bytes: 3/4 of the
chip's VMEM (our kernel's ceiling): with jax's None (Mosaic's 16 MiB scoped default) its default
blocks of 128 pages do not fit from 2k keys per block on (16.4 MiB at pages of 16); at pages of
64 and 16k context (128 pages of 64 tokens, 64 MiB of KV buffers) it does not fit v5p's 48.

Its main loop is the `while_loop` over a sequence's KV blocks inside the loop over the
sequences of a q block: one iteration waits for one block (every page of it, also past kv_len:
it DMAs page 0 in the slots past the sequence's end), starts the next block's page DMAs and
runs the online-softmax update for every head of the head block.
"""
from __future__ import annotations

import functools

import numpy as np

from bench.kernels import paged as paged_mod

KERNEL = "peer_jax_ragged_paged_attention"
CALL_NAME = "ragged_paged_attention_kernel"
# jax's device-name key and TPU version per generation (tuned_block_sizes.get_device_name).
_DEVICE = {"v5e": (5, "TPU v5"), "v5p": (5, "TPU v5"), "v6e": (6, "TPU v6")}

shapes = paged_mod.bf16_shapes
find = paged_mod.find
layout = paged_mod.layout
flops = paged_mod.flops


def _item(shape) -> int:
    return 2 if shape.dtype == "bfloat16" else np.dtype(shape.dtype).itemsize


def block_sizes(shape, chip: str) -> tuple[int, int]:
    """(num_kv_pages_per_block, num_queries_per_block): jax's tuned-table answer on `chip`."""
    from unittest import mock

    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_kernel
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as tuned

    version, device = _DEVICE[chip]
    dt = jnp.dtype(shape.dtype)
    q_heads, combined = jax_kernel.get_min_heads_per_blk(shape.num_q_heads,
                                                         2 * shape.num_kv_heads, dt, dt)
    q_lens, _ = layout(shape)
    with mock.patch.object(tuned, "get_tpu_version", lambda: version), \
            mock.patch.object(tuned, "get_device_name", lambda: device):
        return tuned.get_tuned_block_sizes(dt, dt, q_heads, combined // 2, shape.head_dim,
                                           shape.page_size, sum(q_lens), shape.pages_per_seq)


def heads_per_block(shape) -> int:
    import jax.numpy as jnp
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as jax_kernel

    dt = jnp.dtype(shape.dtype)
    _, combined = jax_kernel.get_min_heads_per_blk(shape.num_q_heads, 2 * shape.num_kv_heads,
                                                   dt, dt)
    return combined // 2


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs) -> [T, Hq, D]."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    from bench.kernels import ragged as ragged_mod
    from pallas_ops.chips import CHIPS

    kv_pages_per_block, queries_per_block = block_sizes(shape, chip)
    fn = functools.partial(ragged_paged_attention, sm_scale=shape.head_dim ** -0.5,
                           num_kv_pages_per_block=kv_pages_per_block,
                           num_queries_per_block=queries_per_block,
                           vmem_limit_bytes=CHIPS[chip].vmem_bytes * 3 // 4)
    return fn, ragged_mod.specs(shape)


def concrete_args(shape, seed: int = 0):
    from bench.kernels import ragged

    return ragged.concrete_args(shape, seed)


def hbm_bytes(shape) -> int:
    """Bytes the call must move (as `paged`: each sequence's pages once, q in, output out)."""
    return paged_mod.hbm_bytes(shape)


def kernel_blocks(shape, chip: str) -> tuple[int, int]:
    """(KV-block iterations, grid steps) of the whole call, following jax's loops: per head
    block and q block, each sequence with rows in the q block walks ceil(kv_len / block) blocks."""
    kv_pages, q_blk = block_sizes(shape, chip)
    block = kv_pages * shape.page_size
    q_lens, kv_lens = layout(shape)
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    nqb = -(-int(cu[-1]) // q_blk)
    head_blocks = shape.num_kv_heads // heads_per_block(shape)
    blocks = 0
    for qb in range(nqb):
        lo, hi = qb * q_blk, (qb + 1) * q_blk
        for s, kv in enumerate(kv_lens):
            if cu[s] < hi and cu[s + 1] > lo:
                blocks += -(-kv // block)
    return blocks * head_blocks, nqb * head_blocks


def main_loop(shape, *, chip: str = "v5p"):
    """The KV-block loop: one iteration moves one whole block (K and V of the head block)."""
    from bench.static import MainLoop

    kv_pages, _ = block_sizes(shape, chip)
    iterations, grid_steps = kernel_blocks(shape, chip)
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=2 * heads_per_block(shape) * kv_pages * shape.page_size
        * shape.head_dim * _item(shape),
        iterations=iterations,
        cores=1,
        outer_iterations=grid_steps,
    )
