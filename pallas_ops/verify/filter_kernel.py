"""The filters' pass: top-k / top-p / min-p thresholds and, mostly, the sample itself, one kernel.

A filtered row keeps {y >= tau} of y = logits * (1/T) (semantics in `reference/verify.py`); its
token is the Gumbel-max winner over the kept set, with the noise of `pallas_ops.rng` (the same
stream as unfiltered rows). This kernel ("verify_filters") copies each filtered sequence's logits
into VMEM, `r` rows x the whole vocabulary per grid step (one HBM read), and works there.

Fast path (one sweep of the VMEM copy): per row and per lane (vocab index mod 128), the 4 largest
logits with their chunk ids, an insertion network of max / min / select. The 512 candidates of a
row hold every entry whose value is above lam = the largest 4th-best over the lanes (an entry
left out is at most its lane's 4th best). The thresholds are found among the candidates: top-k's
k-th largest, top-p's boundary (the total mass of the row, when top-k does not bound it, by one
more sweep: sum exp(y - max)), min-p's max + log(min_p); a row is exact on the fast path when
every threshold it uses lies strictly above lam: then the kept set is inside the candidates,
and its Gumbel-max winner, score and log-sum-exp are computed on the 512 candidates only (the
noise of 512 entries, not of V). Such rows are finished here (`ftok` >= 0); the sampling kernel
only folds their max (to detect a NaN or a row of all -inf, as for every row). bf16 logits sort
as one f32 per entry (the value in the high 16 bits, the chunk id in the low 16), so the network
is float max / min only (~13 VALU ops per logit); f32 logits carry the ids by select (~21 ops
per logit: their HBM time per logit is twice bf16's). Packing stands 2^-100 in for +-0 and the
lowest bf16 for -inf (see `insert`): bf16 subnormal logits read as 2^-100 there.

Fallback (a row whose kept set reaches below lam: k > ~100, or a flat distribution under top-p
or min-p): tau by bisection over the order-preserving keys of x (16 steps for bf16, 32 for f32),
VMEM sweeps of compare + count (top-k) and of compare + sum over exp(y - max) kept in a VMEM
scratch (top-p);
`ftok` = -1, and the sampling kernel (`pallas_ops.verify.kernel`) samples above tau in its own
read of the logits: still two reads. The branch is taken per grid step, only when some row
needs it.

Sequences without a filter (and greedy ones) are not fetched: their block index repeats the
previous block's (the pipeline skips an unchanged block), their compute is skipped, ftok = -1
and tau = -inf. Counts and masses are float32 sums (counts exact to 2^24 entries); a top-p
boundary within float32 rounding of p * mass may fall one value apart from the float64
reference's.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops import rng
from pallas_ops.chips import CHIPS
from pallas_ops.verify.block_sizes import LANES

_NEG_INF = float("-inf")
STEPS = 32          # bisection steps over 32-bit keys: exact
CANDIDATES = 4      # per lane and row
NOT_FAST = -1       # ftok: the row was not finished here
BAD = -2            # ftok: finished here, and invalid (a NaN logit, or all -inf)
UNROLL = 32          # chunks per loop iteration of a sweep (v5p: 53 bundles per 8 chunks of
#                      16 bf16 rows in the insertion sweep at 32, 57 at 16, 66 at 8)
MASS_UNROLL = 32     # of the total-mass sweep (more exps in flight: 28.5 per 8 at 32, 41 at 8)
INTERPRET_UNROLL = 8   # both, when interpreted: the same loops, a smaller program for the CPU
#                        compiler (with 32, a full test run segfaulted in XLA's CPU compile of
#                        a filtered call, twice at the same test; never with the module alone)
_LOWEST_BF16 = -3.3895313892515355e38     # 0xFF7F0000: -inf stands in as this when packed
_TINY = 2.0 ** -100                        # +-0 stand in as this when packed


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


def _key16(x):
    """bf16-valued f32 -> the 16-bit order-preserving key (as int32)."""
    return lax.shift_right_arithmetic(_key(x), jnp.int32(16))


def _unkey16(k):
    return _unkey((k << 16) | (lax.shift_right_arithmetic(k, jnp.int32(31)) & jnp.int32(0xFFFF)))


def _bisect(lo, hi, cond, *, steps=STEPS, unkey=_unkey):
    """The largest key t in [lo, hi] with cond(unkey(t)), given cond(unkey(lo)) holds (keys of
    32 bits: 32 steps; of 16 bits: 16)."""
    def step(_, st):
        lo, hi = st
        mid = _ceil_mid(lo, hi)
        ok = cond(unkey(mid)) & (lo < hi)
        lo = jnp.where(ok, mid, lo)
        hi = jnp.where(ok | (lo >= hi), hi, mid - 1)
        return lo, hi
    return unkey(lax.fori_loop(0, steps, step, (lo, hi))[0])


def _rsum(parts):
    """Sum of a list of [r, 128] arrays over the list and the lanes -> [r, 1]."""
    tot = parts[0]
    for q in parts[1:]:
        tot = tot + q
    return jnp.sum(tot, axis=-1, keepdims=True)


def _kernel(*refs, V, Vp, r, packed, unroll, mass_unroll):
    it = iter(refs)
    # Prefetch
    flags_ref = next(it)        # SMEM int32 [B]: 0 not filtered, else 1 | 2 top-k | 4 top-p | 8
    next(it)                    # SMEM int32 [B]: the block each sequence maps to (index maps)
    # Inputs
    x_ref = next(it)            # VMEM [1, r, Vp] f32/bf16: r rows of one sequence (tail padded)
    invt_ref = next(it)         # VMEM f32 [1, r, 1]: 1/T
    key_ref = next(it)          # VMEM int32 [1, r, 1]: rng row key (stream 0)
    k_ref = next(it)            # VMEM int32 [1, r, 1]: top_k (0 = off)
    p_ref = next(it)            # VMEM f32 [1, r, 1]: top_p (1 = off)
    m_ref = next(it)            # VMEM f32 [1, r, 1]: min_p (0 = off)
    # Outputs
    tau_ref = next(it)          # VMEM f32 [1, r, 1]: kept set {y >= tau} (-inf: none)
    ftok_ref = next(it)         # VMEM int32 [1, r, 1]: winner, or NOT_FAST
    flse_ref = next(it)         # VMEM f32 [1, r, 1]: log-sum-exp of the kept y (fast rows)
    # Scratch
    e_sc = next(it)             # VMEM f32 [r, Vp]: exp(y - M) on y >= tau_k (fallback top-p)

    i = pl.program_id(0)
    flags = flags_ref[i]
    nchunks = Vp // LANES
    ngroups, nrest = divmod(nchunks, unroll)
    tail = V % LANES
    lane = lax.broadcasted_iota(jnp.int32, (r, LANES), 1)

    def x_at(c):
        """Chunk c (traced, or a static int) of the block as f32 [r, 128]; lanes >= V of the
        last chunk (static) are -inf."""
        col = c * LANES if isinstance(c, int) else pl.multiple_of(c * LANES, LANES)
        x = x_ref[0, :, pl.ds(col, LANES)].astype(jnp.float32)
        if tail and isinstance(c, int) and c == nchunks - 1:
            x = jnp.where(lane < V - c * LANES, x, _NEG_INF)
        return x

    def sweep(fn, acc):
        """acc = fn(c, acc) over every chunk, unroll at a time (the last, masked, chunk and the
        remainder of the groups unrolled statically)."""
        last_masked = bool(tail)
        body = ngroups if not (last_masked and nrest == 0) else ngroups - 1
        if body > 0:
            def group(g, a):
                for u in range(unroll):
                    a = fn(g * unroll + u, a)
                return a
            acc = lax.fori_loop(0, body, group, acc)
        for c in range(body * unroll, nchunks):
            acc = fn(c, acc)
        return acc

    def sweep_sum(term):
        """sum over the row of term(c) [r, 128] -> [r, 1], into unroll accumulators (chunk c
        into slot c % unroll: no chain of dependent adds)."""
        body = ngroups if not (tail and nrest == 0) else ngroups - 1
        nacc = min(unroll, 8)
        acc = [jnp.zeros((r, LANES), jnp.float32) for _ in range(nacc)]
        if body > 0:
            def group(g, a):
                a = list(a)
                for u in range(unroll):
                    a[u % nacc] = a[u % nacc] + term(g * unroll + u)
                return tuple(a)
            acc = list(lax.fori_loop(0, body, group, tuple(acc)))
        for c in range(body * unroll, nchunks):
            acc[c % nacc] = acc[c % nacc] + term(c)
        tot = acc[0]
        for a in acc[1:]:
            tot = tot + a
        return jnp.sum(tot, axis=-1, keepdims=True)

    @pl.when(flags == 0)
    def _skip():
        tau_ref[...] = jnp.full(tau_ref.shape, _NEG_INF, jnp.float32)
        ftok_ref[...] = jnp.full(ftok_ref.shape, NOT_FAST, jnp.int32)
        flse_ref[...] = jnp.zeros(flse_ref.shape, jnp.float32)

    @pl.when(flags != 0)
    def _run():
        invt = invt_ref[0]                                             # [r, 1]
        k = k_ref[0]
        p = p_ref[0]
        mp = m_ref[0]
        on_k = (flags & 2) != 0
        on_p = (flags & 4) != 0
        on_m = (flags & 8) != 0

        # 1. Per lane, the CANDIDATES largest x and their chunk ids (descending; equal values
        # keep the earlier chunk first: the lower index, as jnp.argmax).
        if packed:
            # bf16 logits: a bf16-derived f32 has 16 zero low bits; the chunk id goes there, so
            # one f32 per entry carries its value (exactly, in the high 16 bits) and its
            # index, and the network is float max / min alone. -inf becomes the lowest finite
            # bf16 and +-0 the normal 2^-100 first (a packed -inf would be a NaN, a packed
            # zero a subnormal, which compares flushed to zero); within one value, which copy
            # ranks first does not matter (a row is exact only above the lanes' 4th values).
            def insert(x, c, st):
                x = jnp.maximum(jnp.where(x == 0.0, _TINY, x), _LOWEST_BF16)
                cid = jnp.int32(c) if isinstance(c, int) else c
                t = lax.bitcast_convert_type(lax.bitcast_convert_type(x, jnp.int32) | cid,
                                             jnp.float32)
                out = []
                for a in st:
                    out.append(jnp.maximum(a, t))
                    t = jnp.minimum(a, t)
                return tuple(out)

            init = tuple(jnp.full((r, LANES), _LOWEST_BF16, jnp.float32)
                         for _ in range(CANDIDATES))
        else:
            def insert(x, c, st):
                vals, ids = list(st[0]), list(st[1])
                t, ti = x, jnp.full((r, LANES), c, jnp.int32)
                for j in range(CANDIDATES):
                    gt = t > vals[j]
                    hi, lo = jnp.maximum(vals[j], t), jnp.minimum(vals[j], t)
                    ids[j], ti = jnp.where(gt, ti, ids[j]), jnp.where(gt, ids[j], ti)
                    vals[j], t = hi, lo
                return tuple(vals), tuple(ids)

            init = (tuple(jnp.full((r, LANES), _NEG_INF, jnp.float32)
                          for _ in range(CANDIDATES)),
                    tuple(jnp.zeros((r, LANES), jnp.int32) for _ in range(CANDIDATES)))

        def insertion_sweep():
            def group(cs, cand):
                for c in cs:
                    cand = insert(x_at(c), c, cand)
                return cand

            body = ngroups if not (tail and nrest == 0) else ngroups - 1
            cand = init
            if body > 0:
                cand = lax.fori_loop(
                    0, body, lambda g, st: group([g * unroll + u for u in range(unroll)], st),
                    cand)
            if body * unroll < nchunks:
                cand = group(list(range(body * unroll, nchunks)), cand)
            return cand

        p_alone = on_p & jnp.logical_not(on_k)
        cand = insertion_sweep()
        if packed:
            vals, ids = [], []
            for kk in cand:
                bits = lax.bitcast_convert_type(kk, jnp.int32)
                v = lax.bitcast_convert_type(bits & jnp.int32(-65536), jnp.float32)
                # (the padding -inf and the filled-in lowest bf16 read back as -inf)
                vals.append(jnp.where(v == _LOWEST_BF16, _NEG_INF, v))
                ids.append(bits & jnp.int32(0xFFFF))
        else:
            vals, ids = cand
        ys = [v * invt for v in vals]                                   # y of the candidates
        gidx = [ci * LANES + lane for ci in ids]                        # their vocab indices
        Mx = jnp.max(vals[0], axis=-1, keepdims=True)                   # row max of x
        M = Mx * invt
        # (a NaN logit propagates into the max; NaN or all -inf fails the sequence)
        bad = (M != M) | (M == _NEG_INF)
        m_safe = jnp.where(bad, 0.0, M)
        lam = jnp.max(vals[-1], axis=-1, keepdims=True)     # the candidates hold all x > lam

        # 2. Thresholds among the candidates, in x (the order of y = x / T), by bisection over
        # the keys of x: 16 steps for bf16 values, 32 for f32. Exact where above lam.
        kw = dict(steps=16, unkey=_unkey16) if packed else {}
        keyf = _key16 if packed else _key
        key_lo = keyf(jnp.full((r, 1), _NEG_INF, jnp.float32))
        key_mx = keyf(jnp.where(bad, _NEG_INF, Mx))
        kf = k.astype(jnp.float32)
        tx_k = lax.cond(
            on_k,
            lambda: _bisect(key_lo, key_mx, lambda t: _rsum([jnp.where(v >= t, 1.0, 0.0)
                                                             for v in vals]) >= kf, **kw),
            lambda: jnp.full((r, 1), _NEG_INF, jnp.float32))
        tx_k = jnp.where(on_k & (k > 0) & (k < V), tx_k, _NEG_INF)
        ok = jnp.logical_not(on_k) | (tx_k > lam)
        es = [jnp.where(v >= tx_k, jnp.exp(y - m_safe), 0.0) for v, y in zip(vals, ys)]
        # top-p's mass: of the top-k set (inside the candidates), or of the whole row (the
        # insertion sweep's per-lane sums, brought to the row max)
        def total_mass():
            # top-p without top-k: the whole row's mass, one more sweep of the VMEM copy (four
            # accumulators, mass_unroll chunks per iteration: more exps in flight). Fused into
            # the insertion sweep it measured slower (108-118 bundles per 8 chunks against
            # 66 + 41 with 8 chunks per iteration).
            body, rest = divmod(nchunks - (1 if tail else 0), mass_unroll)

            def group(g, a):
                for u in range(mass_unroll):
                    a = a[1:] + (a[0] + jnp.exp(x_at(g * mass_unroll + u) * invt - m_safe),)
                return a
            acc = (jnp.zeros((r, LANES), jnp.float32),) * 4
            if body:
                acc = lax.fori_loop(0, body, group, acc)
            for c in range(body * mass_unroll, nchunks):
                acc = acc[1:] + (acc[0] + jnp.exp(x_at(c) * invt - m_safe),)
            return jnp.sum((acc[0] + acc[1]) + (acc[2] + acc[3]), axis=-1, keepdims=True)

        z = lax.cond(p_alone, total_mass, lambda: _rsum(es))
        target = p * z
        tx_p = lax.cond(
            on_p,
            lambda: _bisect(keyf(tx_k), key_mx,
                            lambda t: _rsum([jnp.where(v >= t, e, 0.0)
                                             for v, e in zip(vals, es)]) >= target, **kw),
            lambda: jnp.full((r, 1), _NEG_INF, jnp.float32))
        tx_p = jnp.where(on_p & (p < 1.0), tx_p, _NEG_INF)
        ok = ok & (jnp.logical_not(on_p) | (tx_p > lam))
        tau_m = jnp.where(on_m & (mp > 0.0), M + jnp.log(jnp.where(mp > 0.0, mp, 1.0)),
                          _NEG_INF)
        ok = ok & (jnp.logical_not(on_m) | (tau_m > lam * invt))
        tau = jnp.maximum(jnp.maximum(tx_k * invt, tx_p * invt), tau_m)
        ok = ok | bad

        # 3. The fast rows' sample: Gumbel-max over the kept candidates (the reference's noise,
        # keyed by the global index), lowest index among equal scores; and their lse.
        key = key_ref[0]
        scores = [jnp.where(y >= tau, y - jnp.log(-jnp.log(rng.uniform(rng.bits(key, g)))),
                            _NEG_INF) for y, g in zip(ys, gidx)]
        best = scores[0]
        for s in scores[1:]:
            best = jnp.maximum(best, s)
        smax = jnp.max(best, axis=-1, keepdims=True)
        big = jnp.int32(2 ** 31 - 1)
        win = scores[0] == smax
        cand = jnp.where(win, gidx[0], big)
        for s, g in zip(scores[1:], gidx[1:]):
            cand = jnp.minimum(cand, jnp.where(s == smax, g, big))
        tok = jnp.min(cand, axis=-1, keepdims=True)
        kept = _rsum([jnp.where(y >= tau, jnp.exp(y - m_safe), 0.0) for y in ys])
        tau_ref[0] = tau
        ftok_ref[0] = jnp.where(ok, jnp.where(bad, BAD, jnp.maximum(tok, 0)), NOT_FAST)
        flse_ref[0] = m_safe + jnp.log(kept)

        # 4. Fallback: exact thresholds by bisection over every entry of the VMEM copy, in x
        # (16 steps for bf16 logits, 32 for f32), as among the candidates.
        @pl.when(jnp.logical_not(jnp.all(ok)))
        def _fallback():
            def col(c):
                return c * LANES if isinstance(c, int) else pl.multiple_of(c * LANES, LANES)

            tk = lax.cond(
                on_k,
                lambda: _bisect(key_lo, key_mx, lambda t: sweep_sum(
                    lambda c: jnp.where(x_at(c) >= t, 1.0, 0.0)) >= kf, **kw),
                lambda: jnp.full((r, 1), _NEG_INF, jnp.float32))
            tk = jnp.where(on_k & (k > 0) & (k < V), tk, _NEG_INF)

            def top_p():
                def store(c):
                    x = x_at(c)
                    e = jnp.where(x >= tk, jnp.exp(x * invt - m_safe), 0.0)
                    e_sc[:, pl.ds(col(c), LANES)] = e
                    return e

                target = p * sweep_sum(store)
                return _bisect(keyf(tk), key_mx, lambda t: sweep_sum(
                    lambda c: jnp.where(x_at(c) >= t, e_sc[:, pl.ds(col(c), LANES)], 0.0))
                    >= target, **kw)

            tp = lax.cond(on_p, top_p, lambda: jnp.full((r, 1), _NEG_INF, jnp.float32))
            tp = jnp.where(on_p & (p < 1.0), tp, _NEG_INF)
            exact = jnp.maximum(jnp.maximum(tk * invt, tp * invt), tau_m)
            tau_ref[0] = jnp.where(ok, tau, exact)


def rows_per_block(bs, V, itemsize, chip):
    """Rows of one sequence per grid step: all bs when two input buffers and the e scratch fit
    in a quarter of the chip's VMEM, else the largest multiple of 16 that does."""
    budget = (CHIPS[chip].vmem_bytes if chip in CHIPS else 64 << 20) // 4
    per_row = -(-V // LANES) * LANES * (2 * itemsize + 4)
    if bs * per_row <= budget:
        return bs
    r = max(16, (budget // per_row) // 16 * 16)
    return min(r, bs)


def filter_flags(active, top_k, top_p, min_p, V):
    """int32 [B]: 0 for sequences that are not filtered, else 1 | 2 (top-k) | 4 (top-p) | 8."""
    f = (1 + 2 * ((top_k > 0) & (top_k < V)) + 4 * (top_p < 1.0) + 8 * (min_p > 0.0))
    return jnp.where(active, f, 0).astype(jnp.int32)


def source_sequences(active):
    """int32 [B]: the last active sequence at or before each one (the first active one before
    any): inactive sequences map onto the block fetched just before them (`block_of`)."""
    B = active.shape[0]
    idx = jnp.arange(B, dtype=jnp.int32)
    last = lax.cummax(jnp.where(active, idx, -1))
    first = jnp.argmax(active).astype(jnp.int32)
    return jnp.where(last >= 0, last, first).astype(jnp.int32)


def block_of(i, g, flags, src, nrg):
    """The (sequence, row group) block grid step (i, g) reads: its own when sequence i is
    filtered; else the block the step before it read (the last row group of the previous
    filtered sequence, or the first filtered sequence's first block before any), which the
    pipeline does not fetch again: only filtered sequences are read."""
    on = flags[i] != 0
    before = src[i] < i
    return src[i], jnp.where(on, g, jnp.where(before, nrg - 1, 0))


def filters_call(logits, inv_t, key, active, top_k, top_p, min_p, *, interpret, chip):
    """logits [B, bs, V]; inv_t f32, key int32 [B, bs] (`xla.row_params`); active bool [B]
    (sampling with a filter); top_k int32, top_p / min_p f32 [B] ->
    (tau f32 [B, bs] (-inf where not active), ftok int32 [B, bs] (winner, or NOT_FAST),
    flse f32 [B, bs] (the kept set's log-sum-exp where ftok >= 0))."""
    B, bs, V = logits.shape
    Vp = -(-V // LANES) * LANES
    itemsize = jnp.dtype(logits.dtype).itemsize
    r = rows_per_block(bs, V, itemsize, chip)
    nrg = pl.cdiv(bs, r)
    flags = filter_flags(active, top_k, top_p, min_p, V)
    src = source_sequences(active)

    def in_map(i, g, flags_ref, src_ref):
        return block_of(i, g, flags_ref, src_ref, nrg) + (0,)

    def out_map(i, g, *_):
        return i, g, 0

    per_row = lambda v, dt: jnp.broadcast_to(v.astype(dt)[:, None, None], (B, bs, 1))  # noqa
    row = pl.BlockSpec((1, r, 1), in_map)
    out = pl.BlockSpec((1, r, 1), out_map)
    n = B * bs * V
    # VALU ops per logit on the fast path: unpack, mask, 4 levels of compare / max / min / two
    # selects; the total-mass sweep (top-p alone) adds ~4 and one exp. The fallback's 32-step
    # bisections are not counted (taken only by rows whose kept set leaves the candidates).
    cost = pl.CostEstimate(flops=n * 22, transcendentals=n,
                           bytes_accessed=n * itemsize + B * bs * 4 * 9)
    vmem = 2 * r * Vp * itemsize + r * Vp * 4 + (1 << 20)
    budget = CHIPS[chip].vmem_bytes if chip in CHIPS else 64 << 20
    packed = jnp.dtype(logits.dtype) == jnp.bfloat16 and Vp // LANES <= 0xFFFF
    unroll = INTERPRET_UNROLL if interpret else UNROLL
    kernel = functools.partial(_kernel, V=V, Vp=Vp, r=r, packed=packed, unroll=unroll,
                               mass_unroll=INTERPRET_UNROLL if interpret else MASS_UNROLL)
    f32 = jax.ShapeDtypeStruct((B, bs, 1), jnp.float32)
    i32 = jax.ShapeDtypeStruct((B, bs, 1), jnp.int32)
    tau, ftok, flse = pl.pallas_call(
        kernel,
        out_shape=[f32, i32, f32],
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(B, nrg),
            in_specs=[pl.BlockSpec((1, r, Vp), in_map)] + [row] * 5,
            out_specs=[out, out, out],
            scratch_shapes=[pltpu.VMEM((r, Vp), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=int(min(budget, max(2 * vmem, 16 << 20))),
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="verify_filters",
    )(flags, src, logits, inv_t[..., None], key[..., None], per_row(top_k, jnp.int32),
      per_row(top_p, jnp.float32), per_row(min_p, jnp.float32))
    return tau[..., 0], ftok[..., 0], flse[..., 0]
