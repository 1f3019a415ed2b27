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

Quantized caches (int8 / float8_e4m3fn / float8_e5m2 with [B, Hkv, S_max] k_scales / v_scales,
`pallas_ops.quant`): the new bf16/f32 rows are quantized in the wrapper with
`pallas_ops.quant.quantize` (per token and KV head, over D). Their 8-bit values go through the same
kernel with CH = 32 (8-bit arrays are (32, 128)-tiled in HBM), moved as raw bytes (fp8 caches are
bitcast to int8 around the kernel; the kernel rotates and selects them as int32). Their scales
cannot: rows [c, c + n) of one head's scales are 4n (or 2n) contiguous bytes, and a TPU DMA's
contiguous inner slice must be a multiple of 512 bytes. So the wrapper writes them with an XLA
dynamic_update_slice per sequence (`pallas_ops.block.xla.append_scales`) into the (donated)
scale arrays. Every other value and scale stays bit-identical.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops import quant
from pallas_ops.block.validation import (
    CACHE_ROW_MULTIPLE,
    QUANT_CACHE_ROW_MULTIPLE,
    check_append_static,
    check_lengths,
    is_host_value,
)
from pallas_ops.block.xla import append_scales
from pallas_ops.execution import resolve_interpret

CHUNK_ROWS = 16   # rows per read-modify-write chunk: a multiple of the 8-row HBM tile
QUANT_CHUNK_ROWS = QUANT_CACHE_ROW_MULTIPLE   # 8-bit caches: the 32-row HBM tile


def _append_kernel(
    # Prefetch
    ctx_lens_ref,   # [B] int32 (SMEM)
    n_new_ref,      # [B] int32 (SMEM)
    # Inputs
    kc_in,          # [B, Hkv, S_max, D] bf16/f32, or int8 (8-bit caches) (HBM, aliased to kc_out)
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
    # Rows are rotated in 32-bit registers: f32 for float caches, int32 for (8-bit) int8 bytes.
    work = jnp.int32 if jnp.issubdtype(obuf.dtype, jnp.integer) else jnp.float32

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
                win = wbuf[x, h].astype(work)                               # [2 CH, D]
                # new row t sits at window row CH + t - i*CH; chunk row r needs t = i*CH + r - shift
                new = pltpu.roll(win, shift + ch, 0)[:ch]
                obuf[x, h] = jnp.where(ok, new.astype(obuf.dtype), obuf[x, h])
        sized(a, "start", "write")
        sized(a, "wait", "write")
        return carry

    jax.lax.fori_loop(0, n_chunks, body, 0)


def append_context(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, k_scales=None,
                   v_scales=None, interpret=None, validate=False):
    """Append new context K/V to the static draft cache in place (Pallas TPU).

    Args:
      k_cache, v_cache: [B, Hkv, S_max, D] bf16/f32, S_max a multiple of 8; or quantized, int8 /
        float8_e4m3fn / float8_e5m2 with k_scales / v_scales, S_max a multiple of 32. Aliased to
        the outputs (donate them, and the scales, under jit for a true in-place update).
      k_new, v_new: [B, n_max, Hkv, D] the caches' dtype (bf16/f32 for a quantized cache: both
        the same; quantized per token and KV head with `pallas_ops.quant.quantize`); row t of
        sequence b goes to cache row ctx_lens[b] + t for t < n_new[b].
      ctx_lens: [B] int32, rows already valid (the write offset).
      n_new: [B] int32 in 0..n_max. ctx_lens + n_new <= S_max is the caller's responsibility
        (checked on the host when both are host arrays, or with validate=True).
      k_scales, v_scales: [B, Hkv, S_max] f32/bf16 (both the same), required for (and only for)
        a quantized cache; the new rows' scales are written at the same rows.
      interpret: see `pallas_ops.execution.resolve_interpret`.
    Returns:
      (k_cache, v_cache) with the rows written, or (k_cache, v_cache, k_scales, v_scales) for a
      quantized cache; every other element is unchanged; lengths are not updated.
    """
    _, _, S_max, _, n_max = check_append_static(k_cache, v_cache, k_new, v_new, ctx_lens, n_new,
                                                k_scales=k_scales, v_scales=v_scales,
                                                row_multiple=CACHE_ROW_MULTIPLE)
    if validate or (is_host_value(ctx_lens) and is_host_value(n_new)):
        check_lengths(S_max, ctx_lens, n_new, n_max=n_max)
    args = (k_cache, v_cache, k_new, v_new, jnp.asarray(ctx_lens), jnp.asarray(n_new))
    interpret = resolve_interpret(interpret)
    if k_scales is None:
        return _append(*args, interpret=interpret)
    return _append_quantized(*args, k_scales, v_scales, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _append(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, interpret):
    return _append_rows(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, ch=CHUNK_ROWS,
                        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",))
def _append_quantized(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, k_scales, v_scales, *,
                      interpret):
    dtype = k_cache.dtype
    kq, ks = quant.quantize(k_new, dtype, scale_dtype=k_scales.dtype)   # [B, n_max, Hkv, D],
    vq, vs = quant.quantize(v_new, dtype, scale_dtype=v_scales.dtype)   # [B, n_max, Hkv]
    as_bytes = lambda x: jax.lax.bitcast_convert_type(x, jnp.int8)  # noqa: E731  (no copy)
    kc, vc = _append_rows(as_bytes(k_cache), as_bytes(v_cache), as_bytes(kq), as_bytes(vq),
                          ctx_lens, n_new, ch=QUANT_CHUNK_ROWS, interpret=interpret)
    return (jax.lax.bitcast_convert_type(kc, dtype), jax.lax.bitcast_convert_type(vc, dtype),
            append_scales(k_scales, ks, ctx_lens, n_new),
            append_scales(v_scales, vs, ctx_lens, n_new))


def _append_rows(k_cache, v_cache, k_new, v_new, ctx_lens, n_new, *, ch, interpret):
    """The pallas_call: k_new / v_new rows into the caches, CH-row read-modify-write chunks."""
    B, Hkv, S_max, D = k_cache.shape
    n_max = k_new.shape[1]
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
