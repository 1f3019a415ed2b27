"""Fused verify/accept from target logits: one Pallas TPU kernel, one read of the logits.

After the target scores a block, decide per sequence how many drafts are accepted and which
token comes next. Greedy rows (T = 0) take the argmax; sampling rows (T > 0) take a Gumbel-max
sample of softmax(logits / T) with the counter-based noise of `pallas_ops.rng`; rows may mix.

Kernel (`pl.pallas_call` named "verify_accept"): grid (sequence blocks, vocabulary tiles). Each
step loads a [bb, bs, tv] tile of logits; per sequence and per 128-lane chunk it folds the scores
into a running per-lane (max, chunk id) kept in VMEM scratch (pure VPU work: no cross-lane
reduction until the end). The running max is taken with jnp.maximum, so a NaN logit leaves a NaN
behind (NaN detection for free); a lane max of -inf over the whole row means every logit was -inf.
The tail tile is masked (entries >= V score -inf). In the last vocabulary step the lanes are
reduced (lowest index on ties, as jnp.argmax), the accept scan runs and tokens are written.
Blocks holding only padding sequences (>= num_seqs) map their DMAs onto the last live block's
last tile (so nothing is fetched) and skip the compute. Greedy sequences skip the noise (a
scalar-prefetched flag per sequence), so a mixed batch pays for sampling only where T > 0.

At one sequence block on a megacore chip (v5p, B = 1) the grid gets a leading "parallel" axis
of two vocabulary halves (`VerifyAcceptBlockSizes.vocab_splits`): each TensorCore folds its
half of every row into per-row statistics (winner, NaN flag, score, lse), which
`xla.merge_splits` merges after the call as `combine_rows` merges vocabulary shards; the accept
scan then runs on those [B, bs] values in XLA.

Filters (top-k / top-p / min-p): sequences with one go through `filter_kernel` first, which
samples most of them from per-lane candidates in its own read; here they are kind 3 (only the
max is folded, to detect a NaN or a row of all -inf) or, when their kept set left the
candidates, kind 2 (sampled above their threshold tau, a row input). A batch the filter pass
finished entirely does not run this kernel (`verify_call`).

The draft_probs path runs the same single pass with an online log-sum-exp, then a small jnp step
(`pallas_ops.verify.xla.finish_probs`): accept test u * q(d) < p(d), and at the first rejection a
Gumbel-max sample of max(0, p - q) from that one row of logits and q (B x V elements, not
B x bs x V).

Static schedule (libtpu 0.0.42.1 bundle dumps, v5p, B=64 bs=16 V=151936 bf16, one 2 MiB grid step =
8 sequences x 8192 vocab = ~2655 HBM cycles per TensorCore at `pallas_ops.chips.CHIPS`'s v5p
bandwidth; `python -m bench static --kernel verify_accept`): greedy 2011 bundles (0.76x: HBM-bound;
the inner fold is 27 bundles per 8 x 16 x 128 logits), one-hot sampling 7200 (2.71x: VALU-bound,
~22 VALU ops per logit for hash + uniform + Gumbel; the EUP takes 2 pushes per 1024 logits, far
from its limit), draft_probs pass 10406 (3.9x); libtpu 0.0.50.1: greedy 1953 (0.74x), sampling 7193
(2.71x). NaN detection relies on jnp.maximum propagating NaN: Mosaic emits vmax.f32, the same
instruction XLA emits for its NaN-propagating HLO max on TPU.
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
from pallas_ops.verify.result import VerifyResult
from pallas_ops.verify.filter_kernel import BAD, NOT_FAST, filters_call
from pallas_ops.verify.xla import (add_logprobs, combine_rows, finish_onehot, finish_probs,
                                   merge_splits, row_drafts, row_params, seq_valid, vocab_offset,
                                   vocab_size)

_NEG_INF = float("-inf")
_BIG = 2 ** 31 - 1


def _round_up(x, m):
    return -(-x // m) * m


def _chunk_unroll(nchunks: int) -> int:
    for u in (8, 4, 2):
        if nchunks % u == 0:
            return u
    return 1


def _kernel(*refs, V, tv, bs, bb, sampling, with_lse, stats, filtered, greedy_lse, splits, nvs):
    it = iter(refs)
    # Prefetch
    ns_ref = next(it)                                  # SMEM int32 [1]: num_seqs
    off_ref = next(it) if stats else None              # SMEM int32 [1]: vocab index of column 0
    samp_ref = next(it) if sampling else None          # SMEM int32 [B]: 0 greedy, 1 sampling,
    #                                                    2 sampling with a filter (T > 0)
    # Inputs
    logits_ref = next(it)                              # VMEM [bb, bs, tv] f32/bf16
    drafts_ref = next(it)                              # VMEM int32 [bb, bs, 1]: d_{j+1} or -1
    if sampling:
        invt_ref = next(it)                            # VMEM f32 [bb, bs, 1]: 1/T
        key_ref = next(it)                             # VMEM int32 [bb, bs, 1]: rng row key
    if filtered:
        tau_ref = next(it)                             # VMEM f32 [bb, bs, 1]: kept y >= tau
        ftok_ref = next(it)                            # VMEM int32 [bb, bs, 1]: the filter
        #                                                pass's token, or NOT_FAST
    # Outputs
    if stats:
        idx_out = next(it)                             # VMEM int32 [bb, bs, 1]: winner per row
        nan_out = next(it)                             # VMEM int32 [bb, bs, 1]: 1 if a NaN logit
        max_out = next(it)                             # VMEM f32 [bb, bs, 1]: the winner's score
        if with_lse:
            lse_out = next(it)                         # VMEM f32 [bb, bs, 1]: lse(logits / T)
    else:
        tok_out = next(it)                             # VMEM int32 [bb, bs, 1]: tokens
        acc_out = next(it)                             # VMEM int32 [bb, 1, 1]: num_accepted
    # Scratch
    m_sc = next(it)                                    # VMEM f32 [bb, bs, 128]: per-lane max score
    c_sc = next(it)                                    # VMEM int32 [bb, bs, 128]: its chunk id
    if with_lse:
        n_sc = next(it)                                # VMEM f32 [bb, bs, 128]: per-lane max x/T
        lm_sc = next(it)                               # VMEM f32 [bb, bs, 1]: lse running max
        ls_sc = next(it)                               # VMEM f32 [bb, bs, 1]: lse running sum

    if splits > 1:   # grid (splits, blocks, tiles per split): split s holds tiles s*nvs ...
        i, vl = pl.program_id(1), pl.program_id(2)
        v = pl.program_id(0) * nvs + vl                # the global vocabulary tile
        nv = pl.cdiv(V, tv)
        first, last = vl == 0, vl == nvs - 1
    else:
        i, v = pl.program_id(0), pl.program_id(1)
        nv = pl.num_programs(1)
        first, last = v == 0, v == nv - 1
    ns = ns_ref[0]
    live = (i * bb < ns) & (v < nv)                    # (a split's steps past the last tile)
    nchunks = tv // LANES
    unroll = _chunk_unroll(nchunks)
    ngroups = nchunks // unroll
    tail = V % tv != 0

    @pl.when(first)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        c_sc[...] = jnp.zeros(c_sc.shape, jnp.int32)
        if with_lse:
            n_sc[...] = jnp.full(n_sc.shape, _NEG_INF, jnp.float32)
            lm_sc[...] = jnp.full(lm_sc.shape, _NEG_INF, jnp.float32)
            ls_sc[...] = jnp.zeros(ls_sc.shape, jnp.float32)

    base = v * tv
    chunk0 = v * nchunks
    lane = lax.broadcasted_iota(jnp.int32, (bs, LANES), 1)
    offset = off_ref[0] if stats else 0               # global vocab index of local column 0
    lim = V - base                                     # valid lanes of this tile (masked tile)

    def load(b, g0, c, masked):
        # One dynamic window per group of `unroll` chunks, static 128-lane slices inside it:
        # the address arithmetic is done once per group, not per chunk.
        win = logits_ref.at[b, :, pl.ds(g0, unroll * LANES)]
        x = win[:, c * LANES:(c + 1) * LANES].astype(jnp.float32)
        if masked:
            x = jnp.where(lane < lim - (g0 + c * LANES), x, _NEG_INF)
        return x

    def lse_tile(b, masked, n, invt, tau):
        # Online log-sum-exp of the kept y = x / T: n is the running per-lane max of y (this
        # tile included); one more sweep of the tile sums exp(y - max).
        n_sc[b] = n
        m_old = lm_sc[b]                                    # [bs, 1]
        m_new = jnp.max(n, axis=-1, keepdims=True)
        m_safe = jnp.where(m_new == _NEG_INF, 0.0, m_new)
        m_bcast = jnp.broadcast_to(m_safe, (bs, LANES))

        def group_sum(g, acc):
            g0 = pl.multiple_of(g * (unroll * LANES), unroll * LANES)
            for c in range(unroll):
                y = load(b, g0, c, masked)
                if invt is not None:
                    y = y * invt
                if tau is not None:
                    y = jnp.where(y >= tau, y, _NEG_INF)
                acc = acc + jnp.exp(y - m_bcast)
            return acc

        acc = lax.fori_loop(0, ngroups, group_sum, jnp.zeros((bs, LANES), jnp.float32))
        ls_sc[b] = ls_sc[b] * jnp.exp(m_old - m_safe) + jnp.sum(acc, -1, keepdims=True)
        lm_sc[b] = m_new

    def greedy_seq(b, masked, lse=True):
        # Per lane and row: m = running max (jnp.maximum: a NaN propagates into m), cid = the
        # first chunk (global 128-lane chunk number) reaching it (strict >: lowest index wins
        # ties). Global index = cid * 128 + lane.
        def group(g, st):
            m, cid = st
            g0 = pl.multiple_of(g * (unroll * LANES), unroll * LANES)
            for c in range(unroll):
                x = load(b, g0, c, masked)
                upd = x > m
                m = jnp.maximum(m, x)
                cid = jnp.where(upd, chunk0 + g * unroll + c, cid)
            return m, cid

        m, cid = lax.fori_loop(0, ngroups, group, (m_sc[b], c_sc[b]))
        m_sc[b] = m
        c_sc[b] = cid
        if greedy_lse and lse:   # log-probabilities of greedy rows: lse of the raw logits (m = its max)
            lse_tile(b, masked, m, None, None)

    def sampling_seq(b, masked, filt):
        # Score x / T + Gumbel(seed, position + j, index): a Gumbel-max sample per row; with a
        # filter, over the kept entries (y >= tau) only.
        invt = jnp.broadcast_to(invt_ref[b], (bs, LANES))
        key = jnp.broadcast_to(key_ref[b], (bs, LANES))
        tau = jnp.broadcast_to(tau_ref[b], (bs, LANES)) if filt else None
        mul = jnp.int32(rng._i32(rng.INDEX_MUL))
        step = jnp.int32(rng._i32(LANES * rng.INDEX_MUL))

        def group(g, st):
            m, cid, n, imul = st
            g0 = pl.multiple_of(g * (unroll * LANES), unroll * LANES)
            for c in range(unroll):
                x = load(b, g0, c, masked)
                y = x * invt
                if filt:
                    y = jnp.where(y >= tau, y, _NEG_INF)
                # y + gumbel = y - log(-log(u)), written so no separate negation is emitted;
                # imul = index * INDEX_MUL (stepped, not multiplied).
                u = rng.uniform(rng.bits_premul(key, imul))
                s = y - jnp.log(-jnp.log(u))
                imul = imul + step
                if with_lse:
                    n = jnp.maximum(n, y)
                upd = s > m
                m = jnp.maximum(m, s)
                cid = jnp.where(upd, chunk0 + g * unroll + c, cid)
            return m, cid, n, imul

        n0 = n_sc[b] if with_lse else m_sc[b]
        m, cid, n, _ = lax.fori_loop(0, ngroups, group,
                                     (m_sc[b], c_sc[b], n0, (lane + base + offset) * mul))
        m_sc[b] = m
        c_sc[b] = cid
        if with_lse:
            lse_tile(b, masked, n, invt, tau)

    def process(masked: bool):
        def seq(b, carry):
            if not sampling:
                greedy_seq(b, masked)
                return carry
            kind = samp_ref[i * bb + b]

            @pl.when(kind == 1)
            def _():
                sampling_seq(b, masked, False)

            if filtered:
                @pl.when(kind == 2)
                def _():
                    sampling_seq(b, masked, True)

                @pl.when(kind == 3)   # sampled by the filter pass: the max only (NaN, -inf)
                def _():
                    greedy_seq(b, masked, lse=False)

            @pl.when(kind == 0)
            def _():
                greedy_seq(b, masked)
            return carry

        lax.fori_loop(0, bb, seq, 0)

    if tail:
        @pl.when(live & (v < nv - 1))
        def _body():
            process(False)

        @pl.when(live & (v == nv - 1))
        def _tail():
            process(True)
    else:
        @pl.when(live)
        def _body():
            process(False)

    @pl.when(last)
    def _finish():
        m = m_sc[...]
        mx = jnp.max(m, axis=-1, keepdims=True)                               # [bb, bs, 1]
        gidx = c_sc[...] * LANES + lax.broadcasted_iota(jnp.int32, m.shape, 2)
        tok = jnp.min(jnp.where(m == mx, gidx, _BIG), axis=-1, keepdims=True)
        nan = jnp.max(jnp.where(m != m, 1, 0), axis=-1, keepdims=True) > 0
        bad = nan | (mx == _NEG_INF)                                          # [bb, bs, 1]
        if filtered:   # rows the filter pass sampled (their NaN / -inf check is the fold's)
            ftok = ftok_ref[...]
            tok = jnp.where(ftok >= 0, ftok, tok)
        if stats:   # per-row statistics; the accept decision is made outside (xla.finish_*)
            # (rows the filter pass sampled: their lse is merged outside)
            idx_out[...] = tok + offset
            nan_out[...] = nan.astype(jnp.int32)
            max_out[...] = mx
            if with_lse:
                lse_out[...] = lm_sc[...] + jnp.log(ls_sc[...])
            return
        seq_id = i * bb + lax.broadcasted_iota(jnp.int32, (bb, 1, 1), 0)
        j = lax.broadcasted_iota(jnp.int32, (bb, bs, 1), 1)
        match = tok == drafts_ref[...]                       # row bs-1 never matches (-1)
        a = jnp.min(jnp.where(match, bs - 1, j), axis=1, keepdims=True)     # [bb, 1, 1]
        fail = (jnp.max(bad.astype(jnp.int32), axis=1, keepdims=True) > 0) | (seq_id >= ns)
        acc_out[...] = jnp.where(fail, 0, a)
        tok_out[...] = jnp.where(fail | (j > a), -1, tok)


def _vmem_estimate(bb, bs, tv, itemsize, with_lse):
    sub = 16 if itemsize == 2 else 8
    tile = bb * _round_up(bs, sub) * tv * itemsize
    rows = bb * _round_up(bs, 8) * LANES * 4          # one [bb, bs, 1|128] 32-bit array
    scratch = 2 * rows + (3 * rows if with_lse else 0)
    small = 2 * 8 * rows                               # row params + outputs, double-buffered
    return 2 * tile + scratch + small


def _verify_call(logits, drafts, ns, samp_seq, params, offset, filter_rows, *, bsz, with_lse,
                 stats, interpret, chip, greedy_lse=False):
    """stats=False: the accept scan in the kernel -> (tokens [B, bs, 1], num_accepted [B, 1, 1]).
    stats=True: per-row statistics of this vocabulary shard (columns offset .. offset + V - 1)
    -> (winner index, NaN flag, winner score[, lse]) each [B, bs, 1]; with bsz.vocab_splits = S
    > 1 (stats only) each [S * B, bs, 1], split s's rows at s * B .. (merged by `merge_splits`)."""
    B, bs, V = logits.shape
    bb, tv = bsz.seqs_per_block, bsz.vocab_tile
    nblk, nv = B // bb, pl.cdiv(V, tv)
    splits = bsz.splits(V)
    nvs = pl.cdiv(nv, splits)
    if splits > 1 and not stats:
        raise ValueError("vocab_splits > 1 needs the per-row statistics path (stats=True)")
    sampling = params is not None

    def blk(i, ns_ref):
        # Blocks holding only padding sequences (i * bb >= num_seqs) re-use the indices of the
        # last live block's last tile: the pipeline skips a DMA whose block index is unchanged,
        # so padding is never fetched. (lax.div: jnp's // lowers through sign(), which Mosaic
        # only lowers on a real TPU.)
        last = jnp.maximum(lax.div(ns_ref[0] + (bb - 1), jnp.int32(bb)), 1) - 1
        return jnp.minimum(i, last), i * bb >= ns_ref[0]

    def grid_ids(g):
        """(split, sequence block, global vocabulary tile, ns_ref) of grid indices g."""
        if splits > 1:
            sp, i, vl, ns_ref = g[:4]
            return sp, i, jnp.minimum(sp * nvs + vl, nv - 1), ns_ref
        i, v, ns_ref = g[:3]
        return 0, i, v, ns_ref

    def logits_map(*g):
        _, i, v, ns_ref = grid_ids(g)
        bi, pad = blk(i, ns_ref)
        return bi, 0, jnp.where(pad, nv - 1, v)

    def row_map(*g):
        _, i, _, ns_ref = grid_ids(g)
        return blk(i, ns_ref)[0], 0, 0

    def out_map(*g):
        sp, i, _, _ = grid_ids(g)
        return sp * nblk + i, 0, 0

    row_spec = pl.BlockSpec((bb, bs, 1), row_map)
    in_specs = [pl.BlockSpec((bb, bs, tv), logits_map), row_spec]
    args = [logits, drafts[..., None]]
    prefetch = [ns]
    if stats:
        prefetch.append(jnp.asarray(offset, jnp.int32).reshape(1))
    if sampling:
        inv_t, _, key = params
        in_specs += [row_spec] * 2
        args += [inv_t[..., None], key[..., None]]
        prefetch.append(samp_seq)
    filtered = filter_rows is not None          # (tau, ftok) [B, bs] of the filter pass
    if filtered:
        in_specs += [row_spec] * 2
        args += [filter_rows[0][..., None], filter_rows[1][..., None]]
    if stats:
        SB = splits * B
        out_shape = [jax.ShapeDtypeStruct((SB, bs, 1), jnp.int32),
                     jax.ShapeDtypeStruct((SB, bs, 1), jnp.int32),
                     jax.ShapeDtypeStruct((SB, bs, 1), jnp.float32)]
        if with_lse:
            out_shape.append(jax.ShapeDtypeStruct((SB, bs, 1), jnp.float32))
        out_specs = [pl.BlockSpec((bb, bs, 1), out_map)] * len(out_shape)
    else:
        out_shape = [jax.ShapeDtypeStruct((B, bs, 1), jnp.int32),
                     jax.ShapeDtypeStruct((B, 1, 1), jnp.int32)]
        out_specs = [pl.BlockSpec((bb, bs, 1), out_map), pl.BlockSpec((bb, 1, 1), out_map)]
    scratch = [pltpu.VMEM((bb, bs, LANES), jnp.float32),
               pltpu.VMEM((bb, bs, LANES), jnp.int32)]
    if with_lse:
        scratch += [pltpu.VMEM((bb, bs, LANES), jnp.float32),
                    pltpu.VMEM((bb, bs, 1), jnp.float32), pltpu.VMEM((bb, bs, 1), jnp.float32)]

    itemsize = jnp.dtype(logits.dtype).itemsize
    n = B * bs * V
    # VALU ops per logit read from the v5p schedule: ~4 greedy (unpack, compare, max, select),
    # ~22 sampling (hash 9, uniform 2, the two logs 4, fold 4, unpack, scale, sub), +5 for lse.
    per_elem = 4 + (18 if sampling else 0) + (5 if with_lse else 0) + (2 if filtered else 0)
    cost = pl.CostEstimate(
        flops=per_elem * n,
        transcendentals=(2 * n if sampling else 0) + (n if with_lse else 0),
        bytes_accessed=n * itemsize + B * bs * 4 * (2 + (3 if sampling else 0) + 2),
    )
    vmem = _vmem_estimate(bb, bs, tv, itemsize, with_lse)
    budget = CHIPS[chip].vmem_bytes if chip in CHIPS else 64 * 1024 * 1024
    if vmem > budget // 2:
        raise ValueError(f"block_sizes {bsz} need ~{vmem} bytes of VMEM, over half the "
                         f"{budget}-byte budget of {chip or 'the fallback chip'}")
    kernel = functools.partial(_kernel, V=V, tv=tv, bs=bs, bb=bb, sampling=sampling,
                               with_lse=with_lse, stats=stats, filtered=filtered,
                               greedy_lse=greedy_lse, splits=splits, nvs=nvs)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(splits, nblk, nvs) if splits > 1 else (nblk, nv),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=scratch,
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(("parallel",) if splits > 1 else ()) + ("parallel", "arbitrary"),
            vmem_limit_bytes=int(min(budget, max(2 * vmem, 16 * 1024 * 1024))),
        ),
        cost_estimate=cost,
        interpret=interpret,
        name="verify_accept",
    )(*prefetch, *args)


def verify_call(logits, draft_tokens, temperature, seed, position, draft_probs, num_seqs, filt,
                *, bsz, interpret, chip, axis=None, logprobs=False, n_top=0):
    """The kernels and the host-side steps around them. axis=None: logits hold the whole
    vocabulary (one-hot drafts: the accept scan runs in the kernel). axis = a mesh axis name:
    logits [B, bs, V_local] are this device's shard of the vocabulary (inside shard_map); the
    kernel returns per-row statistics, which `xla.combine_rows` exchanges across the axis (a few
    scalars per row), and the accept decision follows on every shard alike.

    filt: `Filters` or None. Sequences sampling with a filter go through `filter_kernel` first
    (the others are not read by it), which samples the rows whose kept set its candidates hold;
    when that is every live sequence the sampling kernel is not run at all (one read of the
    logits), else it samples the rest (the filtered ones above their thresholds: their second
    read) and only folds the max of the finished ones."""
    B, bs, V = logits.shape
    params = row_params(B, bs, temperature, seed, position)
    drafts = row_drafts(draft_tokens, vocab_size(V, axis))
    with_lse = (draft_probs is not None and params is not None) or logprobs
    splits = bsz.splits(V)
    stats = with_lse or axis is not None or splits > 1
    ns = jnp.clip(num_seqs, 0, B).reshape(1)
    valid = seq_valid(B, num_seqs)

    def finish(idx, bad, lse, tau):
        if draft_probs is None or params is None:
            res = finish_onehot(idx, bad, drafts, valid)
        else:
            res = finish_probs(logits, draft_probs, drafts, idx, bad, lse, params, seed,
                               position, valid, temperature, axis=axis, tau=tau)
        if logprobs:
            res = add_logprobs(res, logits, params, tau, lse, n_top, axis=axis)
        return res

    def kernel(samp_seq, filtered):
        outs = _verify_call(logits, drafts, ns, samp_seq, params, vocab_offset(V, axis),
                            filtered, bsz=bsz, with_lse=with_lse, stats=stats,
                            interpret=interpret, chip=chip, greedy_lse=logprobs)
        if not stats:
            tok, acc = outs
            return VerifyResult(acc[:, 0, 0], tok[..., 0])
        idx, nan, mx, *lse = (o[..., 0] for o in outs)
        lse = lse[0] if lse else None
        # Both TensorCores' halves of each row (both give a row the filter pass sampled its
        # token, so the merge keeps it).
        idx, nan, mx, lse = merge_splits(idx, nan > 0, mx, lse, splits)
        if filtered is not None and lse is not None:   # rows the filter pass sampled
            lse = jnp.where(filtered[1] >= 0, flse, lse)
        idx, bad, lse = combine_rows(idx, nan, mx, lse, axis)
        return finish(idx, bad, lse, None if filtered is None else filtered[0])

    if params is None or filt is None:
        return kernel(None if params is None else (params[1][:, 0] > 0).astype(jnp.int32), None)
    samp = params[1][:, 0] > 0
    active = filt.active(samp) & valid
    tau, ftok, flse = lax.cond(
        jnp.any(active),
        lambda: filters_call(logits, params[0], params[2], active, *filt, interpret=interpret,
                             chip=chip),
        lambda: (jnp.full((B, bs), -jnp.inf, jnp.float32), jnp.full((B, bs), NOT_FAST, jnp.int32),
                 jnp.zeros((B, bs), jnp.float32)))
    finished = active & jnp.all(ftok != NOT_FAST, axis=1)
    samp_seq = jnp.where(finished, 3, jnp.where(active, 2, samp.astype(jnp.int32)))

    def from_filter_pass():
        return finish(jnp.maximum(ftok, 0), ftok == BAD, flse, tau)

    return lax.cond(jnp.all(finished | ~valid), from_filter_pass,
                    lambda: kernel(samp_seq.astype(jnp.int32), (tau, ftok)))


run_verify_accept = jax.jit(verify_call, static_argnames=("bsz", "interpret", "chip", "axis",
                                                          "logprobs", "n_top"))
