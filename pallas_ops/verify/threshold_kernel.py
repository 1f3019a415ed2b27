"""The filters' first pass: per-row thresholds of top-k / top-p / min-p, one Pallas TPU kernel.

A filtered row keeps {y >= tau} of y = logits * (1/T) (semantics in `reference/verify.py`). This
kernel ("verify_thresholds") reads each filtered sequence's logits once from HBM, [rows, V] at a
time into VMEM, and finds tau there:

- the row max M (one sweep);
- top-k: tau_k = the k-th largest y, by bisection over the 32-bit order-preserving keys of y in
  [key(-inf), key(M)]: the largest key t with count(y >= t) >= k (ties at the k-th value kept);
  32 sweeps of compare + count over the VMEM copy;
- top-p: with e = exp(y - M) on y >= tau_k (kept in a VMEM scratch) and Z its sum, tau_p = the
  largest key t with sum(e; y >= t) >= p * Z, by the same bisection over [tau_k, M];
- min-p: tau_m = M + log(min_p).

tau = max(tau_k, tau_p, tau_m). Every sweep is VMEM-only: the HBM bytes are one read of each
filtered sequence's logits. Sequences without a filter (and greedy ones) are not fetched: their
block index repeats the previous fetched block's (the pipeline skips an unchanged block), their
compute is skipped, and their tau is -inf. The counts and masses are float32 sums (counts exact
to 2^24 entries); a top-p boundary within float32 rounding of p * Z may fall one value apart from
the float64 reference's.

The second pass is `pallas_ops.verify.kernel` with tau as a row input: the Gumbel-max sample and
the log-sum-exp run over the kept set only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.chips import CHIPS
from pallas_ops.verify.block_sizes import LANES

_NEG_INF = float("-inf")
STEPS = 32          # bisection steps over 32-bit keys: exact


def _key(y):
    """f32 -> int32 with the same order (-0.0 just below +0.0)."""
    b = lax.bitcast_convert_type(y, jnp.int32)
    return b ^ (lax.shift_right_arithmetic(b, jnp.int32(31)) & jnp.int32(0x7FFFFFFF))


def _unkey(k):
    b = k ^ (lax.shift_right_arithmetic(k, jnp.int32(31)) & jnp.int32(0x7FFFFFFF))
    return lax.bitcast_convert_type(b, jnp.float32)


def _ceil_mid(lo, hi):
    """ceil((lo + hi) / 2) without int32 overflow (lo <= hi)."""
    sra = lambda v: lax.shift_right_arithmetic(v, jnp.int32(1))   # noqa: E731
    return sra(lo) + sra(hi) + ((lo | hi) & 1)


def _kernel(*refs, V, r):
    it = iter(refs)
    # Prefetch
    act_ref = next(it)          # SMEM int32 [B]: filter flags (1 any, 2 top-k, 4 top-p, 8 min-p)
    next(it)                    # SMEM int32 [B]: the block each sequence maps to (index maps)
    # Inputs
    x_ref = next(it)            # VMEM [1, r, V] f32/bf16: r rows of one sequence
    invt_ref = next(it)         # VMEM f32 [1, r, 1]: 1/T
    k_ref = next(it)            # VMEM int32 [1, r, 1]: top_k (0 = off)
    p_ref = next(it)            # VMEM f32 [1, r, 1]: top_p (1 = off)
    m_ref = next(it)            # VMEM f32 [1, r, 1]: min_p (0 = off)
    # Outputs
    tau_ref = next(it)          # VMEM f32 [1, r, 1]: the threshold in y = x / T (-inf: none)
    # Scratch
    e_sc = next(it)             # VMEM f32 [r, V]: exp(y - M) on y >= tau_k (top-p only)

    i = pl.program_id(0)
    nfull = V // LANES
    w_tail = V % LANES
    unroll = next(u for u in (8, 4, 2, 1) if nfull % u == 0) if nfull else 1

    def y_at(lo, width):
        x = x_ref[0, :, pl.ds(lo, width)].astype(jnp.float32)
        return x * invt_ref[0]

    def sweep(fn, init_full, init_tail):
        """Fold fn(col0, y [r, w], acc) over the row: full 128-lane chunks into a [r, 128]
        accumulator, the static tail into a [r, w_tail] one."""
        acc = init_full
        if nfull:
            def group(g, a):
                for c in range(unroll):
                    col = pl.multiple_of((g * unroll + c) * LANES, LANES)
                    a = fn(col, LANES, a)
                return a
            acc = lax.fori_loop(0, nfull // unroll, group, acc)
        tail = fn(nfull * LANES, w_tail, init_tail) if w_tail else None
        return acc, tail

    def row_reduce(full, tail, op):
        out = op(full, axis=-1, keepdims=True) if nfull else None
        if w_tail:
            t = op(tail, axis=-1, keepdims=True)
            out = t if out is None else (jnp.maximum(out, t) if op is jnp.max else out + t)
        return out

    @pl.when(act_ref[i] == 0)
    def _skip():
        tau_ref[...] = jnp.full(tau_ref.shape, _NEG_INF, jnp.float32)

    @pl.when(act_ref[i] != 0)
    def _run():
        neg = lambda w: jnp.full((r, w), _NEG_INF, jnp.float32)   # noqa: E731
        zero = lambda w: jnp.zeros((r, w), jnp.float32)           # noqa: E731
        mfull, mtail = sweep(lambda c, w, a: jnp.maximum(a, y_at(c, w)), neg(LANES),
                             neg(max(w_tail, 1)))
        M = row_reduce(mfull, mtail, jnp.max)                          # [r, 1]
        k = k_ref[0]
        p = p_ref[0]
        mp = m_ref[0]
        key_lo0 = _key(jnp.full((r, 1), _NEG_INF, jnp.float32))
        key_hi0 = _key(M)

        def bisect(lo, hi, cond):
            def step(_, st):
                lo, hi = st
                mid = _ceil_mid(lo, hi)
                ok = cond(_unkey(mid)) & (lo < hi)
                lo = jnp.where(ok, mid, lo)
                hi = jnp.where(ok | (lo >= hi), hi, mid - 1)
                return lo, hi
            lo, _ = lax.fori_loop(0, STEPS, step, (lo, hi))
            return lo

        def count_ge(t):
            full, tail = sweep(lambda c, w, a: a + jnp.where(y_at(c, w) >= t, 1.0, 0.0),
                               zero(LANES), zero(max(w_tail, 1)))
            return row_reduce(full, tail, jnp.sum)

        flags = act_ref[i]
        tau_ref[0] = jnp.full((r, 1), _NEG_INF, jnp.float32)

        @pl.when((flags & 2) != 0)
        def _top_k():
            kf = k.astype(jnp.float32)
            key_k = bisect(key_lo0, key_hi0, lambda t: count_ge(t) >= kf)
            tau_ref[0] = jnp.where((k > 0) & (k < V), _unkey(key_k), _NEG_INF)

        @pl.when((flags & 4) != 0)
        def _top_p():
            tau_k = tau_ref[0]
            m_safe = jnp.where(M == _NEG_INF, 0.0, M)

            def store(c, w, a):
                y = y_at(c, w)
                e = jnp.where(y >= tau_k, jnp.exp(y - m_safe), 0.0)
                e_sc[:, pl.ds(c, w)] = e
                return a + e
            zf, zt = sweep(store, zero(LANES), zero(max(w_tail, 1)))
            target = p * row_reduce(zf, zt, jnp.sum)

            def mass_ge(t):
                full, tail = sweep(
                    lambda c, w, a: a + jnp.where(y_at(c, w) >= t, e_sc[:, pl.ds(c, w)], 0.0),
                    zero(LANES), zero(max(w_tail, 1)))
                return row_reduce(full, tail, jnp.sum)

            key_p = bisect(_key(tau_k), key_hi0, lambda t: mass_ge(t) >= target)
            tau_ref[0] = jnp.maximum(tau_k, jnp.where(p < 1.0, _unkey(key_p), _NEG_INF))

        tau_m = jnp.where(mp > 0.0, M + jnp.log(jnp.where(mp > 0.0, mp, 1.0)), _NEG_INF)
        tau_ref[0] = jnp.maximum(tau_ref[0], tau_m)


def rows_per_block(bs, V, itemsize, chip):
    """Rows of one sequence per grid step: all bs when two input buffers and the e scratch fit
    in a quarter of the chip's VMEM, else the largest multiple of 16 that does."""
    budget = (CHIPS[chip].vmem_bytes if chip in CHIPS else 64 << 20) // 4
    per_row = V * (2 * itemsize + 4)
    if bs * per_row <= budget:
        return bs
    r = max(16, (budget // per_row) // 16 * 16)
    return min(r, bs)


def filter_flags(active, top_k, top_p, min_p, V):
    """int32 [B]: 0 for sequences that are not filtered, else 1 | 2 (top-k) | 4 (top-p) | 8."""
    f = (1 + 2 * ((top_k > 0) & (top_k < V)) + 4 * (top_p < 1.0) + 8 * (min_p > 0.0))
    return jnp.where(active, f, 0).astype(jnp.int32)


def thresholds_call(logits, inv_t, active, top_k, top_p, min_p, *, interpret, chip):
    """logits [B, bs, V]; inv_t f32 [B, bs]; active bool [B] (sampling with a filter); top_k int32,
    top_p / min_p f32 [B] -> tau f32 [B, bs] (-inf where not active)."""
    B, bs, V = logits.shape
    itemsize = jnp.dtype(logits.dtype).itemsize
    r = rows_per_block(bs, V, itemsize, chip)
    nrg = pl.cdiv(bs, r)
    act = filter_flags(active, top_k, top_p, min_p, V)
    # src[i]: the last active sequence at or before i (the first active one before any):
    # inactive sequences map onto the block fetched just before them, so nothing is fetched.
    idx = jnp.arange(B, dtype=jnp.int32)
    last = lax.cummax(jnp.where(active, idx, -1))
    first = jnp.argmax(active).astype(jnp.int32)
    src = jnp.where(last >= 0, last, first).astype(jnp.int32)

    def x_map(i, g, act_ref, src_ref):
        a = act_ref[i] != 0
        before = src_ref[i] < i                       # inactive, after an active sequence
        return src_ref[i], jnp.where(a, g, jnp.where(before, nrg - 1, 0)), 0

    def row_map(i, g, act_ref, src_ref):
        return x_map(i, g, act_ref, src_ref)

    def out_map(i, g, *_):
        return i, g, 0

    per_row = lambda v, dt: jnp.broadcast_to(v.astype(dt)[:, None, None], (B, bs, 1))  # noqa
    row = pl.BlockSpec((1, r, 1), row_map)
    n = B * bs * V
    cost = pl.CostEstimate(flops=n * (2 + 5 * 2 * STEPS), transcendentals=n,
                           bytes_accessed=n * itemsize + B * bs * 4 * 5)
    vmem = 2 * r * V * itemsize + r * V * 4 + (1 << 20)
    budget = CHIPS[chip].vmem_bytes if chip in CHIPS else 64 << 20
    kernel = functools.partial(_kernel, V=V, r=r)
    tau = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((B, bs, 1), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, nrg),
            in_specs=[pl.BlockSpec((1, r, V), x_map), row, row, row, row],
            out_specs=pl.BlockSpec((1, r, 1), out_map),
            scratch_shapes=[pltpu.VMEM((r, V), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=int(min(budget, max(2 * vmem, 16 << 20))),
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="verify_thresholds",
    )(act, src, logits, inv_t[..., None], per_row(top_k, jnp.int32), per_row(top_p, jnp.float32),
      per_row(min_p, jnp.float32))
    return tau[..., 0]
