"""`append_context`: write newly accepted context K/V into the static draft cache, in place.

A Pallas kernel with grid (B,): ctx_lens and n_new are scalar-prefetched; the caches are aliased
input->output and never leave HBM except for the chunks being written. The cache keeps rows on
the tiled (second-minor) axis, so a DMA may only start at a row offset aligned to the chunk size
CH. Each sequence's destination rows [c, c + n) are therefore covered by aligned CH-row chunks and
written by read-modify-write: DMA the old chunk and a 2*CH-row aligned window of the new rows
(front-padded by CH rows in the wrapper) into VMEM, rotate the window by c mod CH rows
(`pltpu.roll`), keep the old rows outside [c, c + n), and DMA the chunk back. Cache rows outside
[c, c + n) keep their values; rows past S_max are never touched (a short last chunk when S_max is
not a multiple of CH).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.block.validation import (
    CACHE_ROW_MULTIPLE,
    check_append_static,
    check_lengths,
    is_host_value,
)
from pallas_ops.execution import resolve_interpret

CHUNK_ROWS = 16   # rows per read-modify-write chunk: a multiple of the 8-row HBM tile


def _append_kernel(
    # Prefetch
    ctx_lens_ref,   # [B] int32 (SMEM)
    n_new_ref,      # [B] int32 (SMEM)
    # Inputs
    kc_in,          # [B, Hkv, S_max, D] (HBM, aliased to kc_out)
    vc_in,          # [B, Hkv, S_max, D] (HBM, aliased to vc_out)
    kn_hbm,         # [B, Hkv, L, D] new keys, row t at CH + t, zero elsewhere (HBM)
    vn_hbm,         # [B, Hkv, L, D] new values, same layout (HBM)
    # Outputs
    kc_out,         # [B, Hkv, S_max, D] (HBM)
    vc_out,         # [B, Hkv, S_max, D] (HBM)
    # Scratch
    wbuf,           # [2 (k, v), Hkv, 2*CH, D]  window of new rows
    obuf,           # [2 (k, v), Hkv, CH, D]    the cache chunk being rewritten
    sems,           # DMA semaphores [2 (k, v), 3 (window, old, write)]
    *, ch, s_max,
):
    b = pl.program_id(0)
    c = ctx_lens_ref[b]
    n = n_new_ref[b]
    hkv = obuf.shape[1]
    shift = jax.lax.rem(c, ch)                      # c >= 0
    q0 = jax.lax.div(c, ch)
    n_chunks = jnp.where(n > 0, jax.lax.div(shift + n + ch - 1, ch), 0)
    full_chunks, rem = divmod(s_max, ch)
    caches_in, caches_out, news = (kc_in, vc_in), (kc_out, vc_out), (kn_hbm, vn_hbm)

    def chunk_dmas(a, rows, op, which):
        for x in range(2):
            if which == "old":
                cp = pltpu.make_async_copy(caches_in[x].at[b, :, pl.ds(a, rows), :],
                                           obuf.at[x, :, pl.ds(0, rows), :], sems.at[x, 1])
            else:
                cp = pltpu.make_async_copy(obuf.at[x, :, pl.ds(0, rows), :],
                                           caches_out[x].at[b, :, pl.ds(a, rows), :],
                                           sems.at[x, 2])
            getattr(cp, op)()

    def sized(a, op, which):
        if rem == 0:
            chunk_dmas(a, ch, op, which)
        else:
            if full_chunks:
                pl.when(a < full_chunks * ch)(lambda: chunk_dmas(a, ch, op, which))
            pl.when(a == full_chunks * ch)(lambda: chunk_dmas(a, rem, op, which))

    def body(i, carry):
        a = pl.multiple_of((q0 + i) * ch, ch)       # destination rows [a, a + ch)
        w = pl.multiple_of(i * ch, ch)              # source window rows [w, w + 2 ch)
        windows = [pltpu.make_async_copy(news[x].at[b, :, pl.ds(w, 2 * ch), :], wbuf.at[x],
                                         sems.at[x, 0]) for x in range(2)]
        for cp in windows:
            cp.start()
        sized(a, "start", "old")
        for cp in windows:
            cp.wait()
        sized(a, "wait", "old")
        rows = a + jax.lax.broadcasted_iota(jnp.int32, obuf.shape[2:], 0)   # [CH, D]
        ok = (rows >= c) & (rows < c + n)
        for x in range(2):
            for h in range(hkv):
                win = wbuf[x, h].astype(jnp.float32)                        # [2 CH, D]
                # new row t sits at window row CH + t - i*CH; chunk row r needs t = i*CH + r - shift
                new = pltpu.roll(win, shift + ch, 0)[:ch]
                obuf[x, h] = jnp.where(ok, new.astype(obuf.dtype), obuf[x, h])
        sized(a, "start", "write")
        sized(a, "wait", "write")
        return carry

    jax.lax.fori_loop(0, n_chunks, body, 0)


def append_context(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, interpret=None,
                   validate=False):
    """Append new context K/V to the static draft cache in place (Pallas TPU).

    Args:
      k_cache, v_cache: [B, Hkv, S_max, D] bf16/f32, S_max a multiple of 8; aliased to the
        outputs (donate them under jit for a true in-place update).
      k_new, v_new: [B, n_max, Hkv, D] same dtype; row t of sequence b goes to cache row
        ctx_lens[b] + t for t < n_new[b].
      ctx_lens: [B] int32, rows already valid (the write offset).
      n_new: [B] int32 in 0..n_max. ctx_lens + n_new <= S_max is the caller's responsibility
        (checked on the host when both are host arrays, or with validate=True).
      interpret: see `pallas_ops.execution.resolve_interpret`.
    Returns:
      (k_cache, v_cache) with the rows written; lengths are not updated.
    """
    _, _, S_max, _, n_max = check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new,
                                                row_multiple=CACHE_ROW_MULTIPLE)
    if validate or (is_host_value(ctx_lens) and is_host_value(n_new)):
        check_lengths(S_max, ctx_lens, n_new, n_max=n_max)
    return _append(k_cache, v_cache, k_new, v_new, jnp.asarray(ctx_lens), jnp.asarray(n_new),
                   interpret=resolve_interpret(interpret))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _append(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, interpret):
    B, Hkv, S_max, D = k_cache.shape
    n_max = k_new.shape[1]
    ch = CHUNK_ROWS
    max_chunks = -(-(ch - 1 + n_max) // ch)
    L = (max_chunks + 1) * ch
    pad = ((0, 0), (0, 0), (ch, L - ch - n_max), (0, 0))
    kn = jnp.pad(k_new.transpose(0, 2, 1, 3), pad)   # [B, Hkv, L, D]
    vn = jnp.pad(v_new.transpose(0, 2, 1, 3), pad)
    dtype = k_cache.dtype
    it = jnp.dtype(dtype).itemsize
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_append_kernel, ch=ch, s_max=S_max),
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B,),
            in_specs=[any_spec] * 4,
            out_specs=(any_spec, any_spec),
            scratch_shapes=[
                pltpu.VMEM((2, Hkv, 2 * ch, D), dtype),
                pltpu.VMEM((2, Hkv, ch, D), dtype),
                pltpu.SemaphoreType.DMA((2, 3)),
            ],
        ),
        input_output_aliases={2: 0, 3: 1},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=pl.CostEstimate(
            flops=0, transcendentals=0,
            # per chunk: a 2*CH-row window read, an old-chunk read and a chunk write, K and V
            bytes_accessed=int(2 * B * Hkv * max_chunks * 4 * ch * D * it)),
        name="dflash_append_context",
        interpret=interpret,
    )(ctx_lens, n_new, k_cache, v_cache, kn, vn)
