"""`write_kv_pages`: the new tokens' keys/values into their cache pages, in place (Pallas TPU kernel).

HBM arrays are tiled on their last two dims (page_size, D), so a single row of a page cannot be
DMA'd on its own. The kernel therefore works page by page: the wrapper cuts the new tokens into
runs (consecutive tokens of one token block that land in the same page); for each run the
kernel DMAs the page's K and V in ([Hkv, page_size, D] each), merges the run's rows with
selects (rows not written keep their exact bits), and DMAs the page back. Pages are aliased
input->output, so nothing else in the cache is touched (donate the pages under jit to avoid
XLA's copy). Only pages that receive new tokens are read, and those lie below kv_len.

Grid: token blocks of `_TOKENS_PER_BLOCK` rows of k_new/v_new (VMEM tiles), sequential
("arbitrary"): a page shared by two token blocks is rewritten by the second after the first's
write-back completed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.execution import resolve_interpret
from pallas_ops.paged.validation import check_paged_attention_inputs, check_static_write
from pallas_ops.paged.xla import row_sequence_info, token_slots
from pallas_ops.quant import is_quantized, quantize

_TOKENS_PER_BLOCK = 128


def _write_kernel(
    # Prefetch (SMEM)
    run_start_ref,        # [NB + 1] int32: runs of token block b are run_start[b] : run_start[b+1]
    run_token_ref,        # [T_pad] int32: first token of each run
    run_len_ref,          # [T_pad] int32: tokens in each run
    dst_page_ref,         # [T_pad] int32: page of each token
    dst_row_ref,          # [T_pad] int32: row inside that page
    # Inputs
    k_new_ref,            # [tb, Hkv, D] VMEM: this block's new keys
    v_new_ref,            # [tb, Hkv, D] VMEM: this block's new values
    k_pages_in,           # [Hkv, P, page_size, D] HBM (aliased to k_pages_out)
    v_pages_in,           # [Hkv, P, page_size, D] HBM (aliased to v_pages_out)
    # Outputs
    k_pages_out,          # [Hkv, P, page_size, D] HBM
    v_pages_out,          # [Hkv, P, page_size, D] HBM
    # Scratch
    k_page_buf,           # [Hkv, page_size, D] VMEM
    v_page_buf,           # [Hkv, page_size, D] VMEM
    sems,                 # DMA semaphores [2 (K, V)]
):
    del k_pages_in, v_pages_in  # same buffers as the outputs
    tb, hkv, _ = k_new_ref.shape
    page_size = k_page_buf.shape[1]
    b = pl.program_id(0)
    t0 = b * tb

    def run(r, carry):
        first, length = run_token_ref[r], run_len_ref[r]
        page = dst_page_ref[first]
        k_in = pltpu.make_async_copy(k_pages_out.at[:, page], k_page_buf, sems.at[0])
        v_in = pltpu.make_async_copy(v_pages_out.at[:, page], v_page_buf, sems.at[1])
        k_in.start()
        v_in.start()
        k_in.wait()
        v_in.wait()
        rows = lax.broadcasted_iota(jnp.int32, (page_size, k_page_buf.shape[2]), 0)

        def merge(i, carry):
            t = first + i
            row_mask = rows == dst_row_ref[t]
            k_tok = k_new_ref[t - t0]                      # [Hkv, D]
            v_tok = v_new_ref[t - t0]
            for h in range(hkv):
                k_page_buf[h] = jnp.where(row_mask, k_tok[h:h + 1, :], k_page_buf[h])
                v_page_buf[h] = jnp.where(row_mask, v_tok[h:h + 1, :], v_page_buf[h])
            return carry

        lax.fori_loop(0, length, merge, 0)
        k_out = pltpu.make_async_copy(k_page_buf, k_pages_out.at[:, page], sems.at[0])
        v_out = pltpu.make_async_copy(v_page_buf, v_pages_out.at[:, page], sems.at[1])
        k_out.start()
        v_out.start()
        k_out.wait()
        v_out.wait()
        return carry

    lax.fori_loop(run_start_ref[b], run_start_ref[b + 1], run, 0)


def write_kv_pages(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                   k_scales=None, v_scales=None, validate=False, interpret=None):
    """Writes the new tokens' keys/values into their pages, in place.

    Args:
      k_pages, v_pages: [Hkv, P, page_size, D] bf16/f32: the caches (aliased to the outputs;
        donate them under jit to update in place).
      k_new, v_new: [T, Hkv, D], same dtype as the pages (8-bit pages: bf16 / f32 rows).
      kv_lens: int32 [S]: keys per sequence, already counting the new tokens.
      page_indices: int32 [S, pages_per_seq]; cu_q_lens: int32 [S + 1]; num_seqs: int32 scalar
        or [1]: as in `paged_attention`.
      k_scales, v_scales: [Hkv, P, page_size] f32/bf16, required for 8-bit pages (int8,
        float8_e4m3fn, float8_e5m2): each new row is quantized per (head, token) by
        `pallas_ops.quant.quantize` (absmax / qmax, round to nearest, saturate); the kernel
        writes the 8-bit values, an XLA scatter the scales (page-sized scale runs are below the
        TPU's 512-byte DMA granule). Donate them too under jit.
      validate: check the dynamic facts on the host first (needs concrete arrays).
      interpret: see `pallas_ops.execution.resolve_interpret`.
    Token i of sequence s is written at position kv_lens[s] - q_len_s + i, i.e. into page
    page_indices[s, pos // page_size], row pos % page_size. Rows past cu_q_lens[num_seqs] are not
    written; every other element of the pages keeps its exact bits.
    Returns: (k_pages, v_pages), updated; (k_pages, v_pages, k_scales, v_scales) for 8-bit pages.
    """
    if isinstance(num_seqs, int):
        num_seqs = jnp.int32(num_seqs)
    check_static_write(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs,
                       k_scales, v_scales)
    if validate:
        check_paged_attention_inputs(k_new, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    interpret = resolve_interpret(interpret)
    if not is_quantized(k_pages.dtype):
        return _write_kv_pages(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                               num_seqs, interpret=interpret)
    return _write_quantized(k_pages, v_pages, k_scales, v_scales, k_new, v_new, kv_lens,
                            page_indices, cu_q_lens, num_seqs, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _write_quantized(k_pages, v_pages, k_scales, v_scales, k_new, v_new, kv_lens, page_indices,
                     cu_q_lens, num_seqs, *, interpret):
    kq, ksc = quantize(k_new, k_pages.dtype, scale_dtype=k_scales.dtype)
    vq, vsc = quantize(v_new, v_pages.dtype, scale_dtype=v_scales.dtype)
    k_pages, v_pages = _write_kv_pages(k_pages, v_pages, kq, vq, kv_lens, page_indices,
                                       cu_q_lens, num_seqs, interpret=interpret)
    page, row = token_slots(kv_lens, page_indices, cu_q_lens, num_seqs, k_new.shape[0],
                            page_size=k_pages.shape[2], total_pages=k_pages.shape[1])
    k_scales = k_scales.at[:, page, row].set(ksc.T, mode="drop")
    v_scales = v_scales.at[:, page, row].set(vsc.T, mode="drop")
    return k_pages, v_pages, k_scales, v_scales


def _runs(dst_page, valid, tb):
    """Runs of consecutive valid tokens in one token block and one page."""
    t_pad = dst_page.shape[0]
    t = jnp.arange(t_pad, dtype=jnp.int32)
    prev_page = jnp.concatenate([jnp.full((1,), -1, jnp.int32), dst_page[:-1]])
    starts = valid & ((t % tb == 0) | (dst_page != prev_page))
    (run_token,) = jnp.nonzero(starts, size=t_pad, fill_value=0)
    run_token = run_token.astype(jnp.int32)
    n_runs = jnp.sum(starts, dtype=jnp.int32)
    n_valid = jnp.sum(valid, dtype=jnp.int32)      # valid tokens are a prefix
    nxt = jnp.concatenate([run_token[1:], jnp.zeros((1,), jnp.int32)])
    r = jnp.arange(t_pad, dtype=jnp.int32)
    run_end = jnp.where(r + 1 < n_runs, nxt, n_valid)
    run_len = jnp.where(r < n_runs, run_end - run_token, 0)
    blocks = jnp.arange(t_pad // tb + 1, dtype=jnp.int32)
    block_of_run = jnp.where(r < n_runs, run_token // tb, t_pad // tb)
    run_start = jnp.searchsorted(block_of_run, blocks, side="left").astype(jnp.int32)
    return run_start, run_token, run_len.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _write_kv_pages(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                    interpret):
    t, hkv, d = k_new.shape
    total_pages, page_size = k_pages.shape[1], k_pages.shape[2]
    pps = page_indices.shape[1]
    tb = min(_TOKENS_PER_BLOCK, -(-t // 8) * 8)
    nb = -(-t // tb)
    t_pad = nb * tb
    seq, pos, valid = row_sequence_info(cu_q_lens, kv_lens, num_seqs, t)
    slot = jnp.clip(pos // page_size, 0, pps - 1)
    dst_page = jnp.where(valid, page_indices[seq, slot], 0)
    dst_page = jnp.clip(dst_page, 0, total_pages - 1).astype(jnp.int32)
    dst_row = jnp.where(valid, pos % page_size, 0).astype(jnp.int32)
    pad = t_pad - t
    dst_page = jnp.pad(dst_page, (0, pad))
    dst_row = jnp.pad(dst_row, (0, pad))
    valid = jnp.pad(valid, (0, pad))
    run_start, run_token, run_len = _runs(dst_page, valid, tb)
    k_new = jnp.pad(k_new, ((0, pad), (0, 0), (0, 0)))
    v_new = jnp.pad(v_new, ((0, pad), (0, 0), (0, 0)))

    item = jnp.dtype(k_pages.dtype).itemsize
    tile = pl.BlockSpec((tb, hkv, d), lambda b, *_: (b, 0, 0))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        _write_kernel,
        out_shape=(jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(v_pages.shape, v_pages.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(nb,),
            in_specs=[tile, tile, any_spec, any_spec],
            out_specs=(any_spec, any_spec),
            scratch_shapes=[pltpu.VMEM((hkv, page_size, d), k_pages.dtype),
                            pltpu.VMEM((hkv, page_size, d), k_pages.dtype),
                            pltpu.SemaphoreType.DMA((2,))],
        ),
        # Operand order: 5 prefetch arrays, k_new, v_new, k_pages (7), v_pages (8).
        input_output_aliases={7: 0, 8: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        cost_estimate=pl.CostEstimate(
            flops=0, transcendentals=0,
            bytes_accessed=2 * k_new.size * item + 4 * t * hkv * page_size * d * item),
        name="dflash_write_kv_pages",
        interpret=interpret,
    )(run_start, run_token, run_len, dst_page, dst_row, k_new, v_new, k_pages, v_pages)
