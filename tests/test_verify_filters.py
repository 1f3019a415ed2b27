"""top-k / top-p / min-p and logprobs of verify/accept, against the float64 reference.

The kernel path (the filter pass `pallas_ops.verify.filter_kernel`, fast path and fallback, then
the sampling kernel) and the plain-jnp twin equal the reference token for token for fixed seeds;
logprobs match a float64 log-softmax computed here; chi-square tests check the emitted tokens
against the filtered distribution (with the twin over many seeds; the kernel is shown equal to
the twin on a large batch); zero-probability tokens are never emitted; bad input raises.
"""
import functools
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from pallas_ops.execution import race_check_params, races_found, resolve_interpret
from pallas_ops.verify import VerifyAcceptBlockSizes, verify_accept
from pallas_ops.verify import xla as verify_xla
from pallas_ops.verify.filter_kernel import NOT_FAST, block_of, filters_call, source_sequences
from pallas_ops.verify.xla import row_params
from reference import verify as ref
from tests.test_verify import N_DRAWS, _check_positions, assert_same
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

PROFILE = os.environ.get("PALLAS_DFLASH_PROFILE", "ci")
DTYPES = [jnp.float32, jnp.bfloat16]


def _examples(n):
    return n if PROFILE == "ci" else 10 * n


def make_case(seed, B, bs, V, dtype, *, spread=3.0, ties=False, neg_inf=False, probs=False,
              k=None, p=None, m=None):
    """Logits (rounded to dtype, as float64), drafts (argmax, or random), and kwargs with
    per-sequence filters (drawn when not given; some sequences greedy, some unfiltered)."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, bs, V)) * spread
    if ties:
        x = np.round(x)
    if neg_inf:
        x[r.random(x.shape) < 0.3] = -np.inf
        x[..., 0] = np.where(np.isinf(x[..., 0]), -1.0, x[..., 0])
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)).astype(np.float64)
    d = x.argmax(-1)[:, :-1].astype(np.int32)
    d = np.where(r.random(d.shape) < 0.6, d, r.integers(0, V, d.shape)).astype(np.int32)
    t = r.uniform(0.4, 1.8, B).astype(np.float32)
    t[r.random(B) < 0.2] = 0.0
    kw = dict(temperature=t, seed=r.integers(-2 ** 31, 2 ** 31 - 1, B).astype(np.int32),
              position=r.integers(0, 2 ** 20, B).astype(np.int32))
    kw["top_k"] = (np.full(B, k) if k is not None
                   else r.choice([0, 1, 3, 20, 60, 700], B)).astype(np.int32)
    kw["top_p"] = (np.full(B, p) if p is not None
                   else r.choice([1.0, 0.3, 0.8, 0.95], B)).astype(np.float32)
    kw["min_p"] = (np.full(B, m) if m is not None
                   else r.choice([0.0, 0.02, 0.2], B)).astype(np.float32)
    if probs:
        q = r.dirichlet(np.full(V, 0.5), size=(B, bs - 1))
        kw["draft_probs"] = np.asarray(jnp.asarray(q, dtype).astype(jnp.float32))
    return x, d, kw


def _jnp(x, d, kw, dtype):
    jkw = {n: jnp.asarray(v) for n, v in kw.items()}
    if "draft_probs" in jkw:
        jkw["draft_probs"] = jkw["draft_probs"].astype(dtype)
    return jnp.asarray(x, dtype), jnp.asarray(d), jkw


def _check(got, want, logprobs):
    assert_same(got, want)
    if logprobs:
        np.testing.assert_allclose(np.asarray(got.logprobs), want.logprobs, rtol=2e-5,
                                   atol=2e-5)


@settings(max_examples=_examples(6), deadline=None)
@given(data=st.data())
def test_filtered_sampling_matches_reference(data):
    B = data.draw(st.integers(1, 4))
    bs = data.draw(st.sampled_from([1, 2, 5, 16]))
    V = data.draw(st.sampled_from([7, 128, 300, 1000, 2500]))
    dtype = data.draw(st.sampled_from(DTYPES))
    spread = data.draw(st.sampled_from([0.3, 3.0]))     # flat rows push top-p to the fallback
    case = make_case(data.draw(st.integers(0, 2 ** 16)), B, bs, V, dtype, spread=spread,
                     ties=data.draw(st.booleans()), neg_inf=data.draw(st.booleans()),
                     probs=data.draw(st.booleans()) and bs > 1)
    lp = data.draw(st.booleans())
    want = ref.verify_accept(*case[:2], return_logprobs=lp, **case[2])
    jl, jd, jkw = _jnp(*case, dtype)
    bb = data.draw(st.sampled_from([1, 2]))
    bsz = VerifyAcceptBlockSizes(max(x for x in range(1, bb + 1) if B % x == 0),
                                 data.draw(st.sampled_from([128, 256])))
    _check(verify_accept(jl, jd, block_sizes=bsz, return_logprobs=lp, **jkw), want, lp)
    _check(verify_xla.verify_accept(jl, jd, return_logprobs=lp, **jkw), want, lp)


def _paths(x, kw, dtype):
    """ftok of the filter pass: which rows its fast path finished."""
    jl = jnp.asarray(x, dtype)
    B, bs, V = x.shape
    params = row_params(B, bs, jnp.asarray(kw["temperature"]), jnp.asarray(kw["seed"]),
                        jnp.asarray(kw["position"]))
    _, ftok, _ = filters_call(jl, params[0], params[2], params[1][:, 0] > 0,
                              jnp.asarray(kw["top_k"]), jnp.asarray(kw["top_p"]),
                              jnp.asarray(kw["min_p"]), interpret=resolve_interpret(None),
                              chip=None)
    return np.asarray(ftok)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what, k, p, m, spread, fast", [
    ("top-k 20 of a peaked row", 20, 1.0, 0.0, 3.0, True),
    ("top-k 700: past the 512 candidates", 700, 1.0, 0.0, 3.0, False),
    ("top-p 0.9 peaked", 0, 0.9, 0.0, 6.0, True),
    ("top-p 0.9 of a flat row", 0, 0.9, 0.0, 0.2, False),
    ("min-p 0.1 peaked", 0, 1.0, 0.1, 6.0, True),
    ("min-p 0.01 of a flat row", 0, 1.0, 0.01, 0.2, False),
    ("top-k 50 and top-p 0.8", 50, 0.8, 0.0, 3.0, True),
])
def test_both_paths_of_the_filter_pass(dtype, what, k, p, m, spread, fast):
    """The fast path (kept set inside the per-lane candidates) and the fallback (bisection over
    the VMEM copy, then the sampling kernel above tau) each equal the reference."""
    B, bs, V = 2, 3, 4000
    x, d, kw = make_case(7, B, bs, V, dtype, spread=spread, k=k, p=p, m=m)
    kw["temperature"] = np.full(B, 0.9, np.float32)
    ftok = _paths(x, kw, dtype)
    assert ((ftok != NOT_FAST).all() if fast else (ftok == NOT_FAST).all()), (what, ftok)
    want = ref.verify_accept(x, d, return_logprobs=True, **kw)
    jl, jd, jkw = _jnp(x, d, kw, dtype)
    _check(verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(1, 512),
                         return_logprobs=True, **jkw), want, True)


def _seed_batch(x_row, B, dtype, **filt):
    """B copies of one [bs, V] logits block (rounded to dtype) with B different seeds, T = 1
    and the filters."""
    x_row = np.asarray(jnp.asarray(x_row, dtype).astype(jnp.float32), np.float64)
    x = np.broadcast_to(x_row, (B,) + x_row.shape).copy()
    d = np.full((B, x.shape[1] - 1), 0, np.int32)
    kw = dict(temperature=np.ones(B, np.float32), seed=np.arange(B, dtype=np.int32) * 11 + 5,
              position=np.zeros(B, np.int32), top_k=np.zeros(B, np.int32),
              top_p=np.ones(B, np.float32), min_p=np.zeros(B, np.float32))
    for name, v in filt.items():
        kw[name] = np.full(B, v, kw[name].dtype)
    return x, d, kw


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_beyond_a_lanes_candidates_take_the_fallback(dtype):
    """Six equal top logits in one lane (vocab indices 0, 128, ..., 640): top-k 3 keeps all six
    (ties at the k-th value), but a lane keeps only 4 candidates. The row must not be sampled
    from its candidates (its threshold equals the lanes' 4th value); the samples over 64 seeds
    equal the reference's, which spread over all six."""
    V = 1024
    row = np.full((1, V), -10.0)
    row[0, 0:6 * 128:128] = 5.0
    x, d, kw = _seed_batch(row, 64, dtype, top_k=3)
    assert (_paths(x, kw, dtype) == NOT_FAST).all()
    want = ref.verify_accept(x, d, **kw)
    assert set(want.tokens[:, 0].tolist()) == set(range(0, 6 * 128, 128))
    assert_same(verify_accept(*_jnp(x, d, kw, dtype)[:2], **_jnp(x, d, kw, dtype)[2]), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_p_alone_counts_the_mass_outside_the_candidates(dtype):
    """Ten large distinct logits and a long flat tail holding ~16% of the mass: top-p 0.8 keeps
    a prefix of the ten (inside the candidates: the fast path), and where its boundary falls
    depends on the tail's mass, which lies mostly outside the 512 candidates."""
    V = 6000
    row = np.full((1, V), -0.5)
    row[0, 100:110] = 8.0 - 0.1 * np.arange(10)
    x, d, kw = _seed_batch(row, 64, dtype, top_p=0.8)
    y = np.asarray(jnp.asarray(row[0], dtype).astype(jnp.float32), np.float64)
    full = ref.filter_threshold(y, 0, 0.8)
    top512 = np.sort(y)[::-1][:512]
    w = np.exp(top512 - y.max())
    cut = top512[np.argmax(np.cumsum(w) >= 0.8 * w.sum())]
    assert cut > full          # the candidates' mass alone would keep fewer tokens
    assert (_paths(x, kw, dtype) != NOT_FAST).all()
    want = ref.verify_accept(x, d, **kw)
    assert_same(verify_accept(*_jnp(x, d, kw, dtype)[:2], **_jnp(x, d, kw, dtype)[2]), want)


@pytest.mark.parametrize("seed", range(6))
def test_the_filter_pass_fetches_only_filtered_sequences(seed):
    """Walk the filter pass's grid in order with its index map: the blocks it fetches (a block
    index that differs from the step before) are exactly the filtered sequences' blocks, each
    once; unfiltered sequences repeat the previous step's block (no DMA)."""
    r = np.random.default_rng(seed)
    B, nrg = int(r.integers(1, 9)), int(r.integers(1, 4))
    active = r.random(B) < 0.5
    active[r.integers(0, B)] = True
    flags = jnp.where(jnp.asarray(active), 1, 0)
    src = source_sequences(jnp.asarray(active))
    fetched, prev = [], None
    for i in range(B):
        for g in range(nrg):
            blk = tuple(int(v) for v in block_of(i, g, flags, src, nrg))
            if active[i]:
                assert blk == (i, g)
            if blk != prev:
                fetched.append(blk)
            prev = blk
    assert fetched == [(i, g) for i in range(B) if active[i] for g in range(nrg)]


def test_invalid_filtered_sequences_fail():
    """A NaN or a row of all -inf in a filtered sequence fails it, on either path."""
    B, bs, V = 3, 3, 600
    x, d, kw = make_case(5, B, bs, V, jnp.float32, k=10, p=1.0, m=0.0)
    kw["temperature"][:] = 1.0
    x[0, 1, 7] = np.nan
    x[1, 2, :] = -np.inf
    want = ref.verify_accept(x, d, **kw)
    assert (want.tokens[:2] == -1).all() and (want.tokens[2, 0] >= 0)
    jl, jd, jkw = _jnp(x, d, kw, jnp.float32)
    assert_same(verify_accept(jl, jd, **jkw), want)
    assert_same(verify_xla.verify_accept(jl, jd, **jkw), want)


@pytest.mark.parametrize("mode", ["on_wait", "eager"])
def test_no_races_with_filters(mode):
    x, d, kw = make_case(11, 4, 3, 700, jnp.bfloat16, spread=0.3)
    jl, jd, jkw = _jnp(x, d, kw, jnp.bfloat16)
    got = verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(2, 256),
                        interpret=race_check_params(mode), **jkw)
    jax.block_until_ready(got)
    assert not races_found()
    assert_same(got, ref.verify_accept(x, d, **kw))


# ---------------------------------------------------------------------------------------------
# Logprobs.

def _log_softmax(y):
    y = np.asarray(y, np.float64)
    m = y.max(-1, keepdims=True)
    return y - m - np.log(np.exp(y - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("impl", ["kernel", "xla"])
def test_logprobs_against_float64_log_softmax(impl):
    """Greedy rows: log_softmax(logits)[token]; sampling rows without a filter: log_softmax(
    logits / T)[token]; with top-k 1 the kept set is the argmax alone: logprob 0. top_logprobs:
    the n largest of the same distribution, descending."""
    B, bs, V = 3, 4, 500
    r = np.random.default_rng(2)
    x = r.normal(size=(B, bs, V)) * 2
    d = x.argmax(-1)[:, :-1].astype(np.int32)
    t = np.array([0.0, 0.7, 1.3], np.float32)
    k = np.array([0, 0, 1], np.int32)
    fn = verify_accept if impl == "kernel" else verify_xla.verify_accept
    res = fn(jnp.asarray(x, jnp.float32), jnp.asarray(d), temperature=jnp.asarray(t),
             seed=jnp.arange(B, dtype=jnp.int32), top_k=jnp.asarray(k), return_logprobs=True,
             top_logprobs=3)
    tok, lp = np.asarray(res.tokens), np.asarray(res.logprobs)
    xs = x.astype(np.float32).astype(np.float64)
    for b in range(B):
        dist = _log_softmax(xs[b] / (t[b] if t[b] > 0 else 1.0))
        for j in range(bs):
            if tok[b, j] < 0:
                assert lp[b, j] == 0
                continue
            want = 0.0 if k[b] == 1 else dist[j, tok[b, j]]
            assert abs(lp[b, j] - want) < 2e-5, (b, j, lp[b, j], want)
            top = np.asarray(res.top_logprobs)[b, j]
            ids = np.asarray(res.top_tokens)[b, j]
            if k[b] == 1:
                assert top[0] == 0 and (top[1:] == -np.inf).all() and (ids[1:] == -1).all()
            else:
                order = np.argsort(-dist[j])[:3]
                np.testing.assert_array_equal(ids, order)
                np.testing.assert_allclose(top, dist[j, order], atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Sampling follows the filtered distribution.

def _filtered(x, T, k=0, p=1.0, m=0.0):
    out = []
    for row in x:
        y = row / T
        tau = ref.filter_threshold(y, k, p, m)
        z = np.where(y >= tau, np.exp(y - y.max()), 0.0)
        out.append(z / z.sum())
    return np.stack(out)


def _rows(seed, bs, V):
    r = np.random.default_rng(seed)
    x = r.normal(size=(bs, V)) * 1.5
    x[:, 1] += 2.0
    x[r.random((bs, V)) < 0.2] = -np.inf
    x[:, 1] = np.where(np.isinf(x[:, 1]), 2.0, x[:, 1])
    x[:, 5] = x[:, 6]                     # a tie, kept or dropped together
    return x


@pytest.mark.parametrize("k, p, m", [(3, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.15),
                                     (4, 0.8, 0.05), (5, 0.9, 0.0)])
@pytest.mark.parametrize("probs", [False, True])
def test_filtered_sampling_follows_the_filtered_distribution(k, p, m, probs):
    bs, V, T = 3, 12, 0.9
    x = _rows(31, bs, V)
    pf = _filtered(x, T, k, p, m)
    assert (pf > 0).sum(-1).max() >= 3 and (pf == 0).any()       # a real filter
    r = np.random.default_rng(32)
    kw = dict(temperature=jnp.full((N_DRAWS,), T, jnp.float32),
              seed=jnp.arange(N_DRAWS, dtype=jnp.int32) * 7 + 3,
              position=jnp.asarray(r.integers(0, 2 ** 30, N_DRAWS), jnp.int32),
              top_k=jnp.full((N_DRAWS,), k, jnp.int32), top_p=jnp.full((N_DRAWS,), p),
              min_p=jnp.full((N_DRAWS,), m))
    if probs:   # drafts sampled from q, which puts mass on filtered-out tokens too
        q = r.dirichlet(np.full(V, 0.7), size=bs - 1)
        drafts = np.stack([r.choice(V, size=N_DRAWS, p=q[j]) for j in range(bs - 1)], 1)
        kw["draft_probs"] = jnp.asarray(np.broadcast_to(q, (N_DRAWS, bs - 1, V)), jnp.float32)
    else:
        drafts = np.ones((N_DRAWS, bs - 1), np.int64)
    res = verify_xla.verify_accept(jnp.asarray(np.broadcast_to(x, (N_DRAWS, bs, V)), jnp.float32),
                                   jnp.asarray(drafts, jnp.int32), **kw)
    tokens = np.asarray(res.tokens)
    if probs:   # random drafts are rarely accepted: the first position is always reached
        tokens, pf = tokens[:, :1], pf[:1]
    _check_positions(tokens, pf, min_reached=300)


def test_kernel_filtered_large_batch_equals_xla():
    """The kernel (fast path and fallback rows mixed) equals the twin draw for draw."""
    B, bs, V = 64, 3, 1000
    r = np.random.default_rng(41)
    x = np.where(r.random((B, 1, 1)) < 0.5, 3.0, 0.2) * r.normal(size=(B, bs, V))
    kw = dict(temperature=jnp.full((B,), 0.8), seed=jnp.arange(B, dtype=jnp.int32),
              top_k=jnp.asarray(r.choice([0, 5, 600], B), jnp.int32),
              top_p=jnp.asarray(r.choice([1.0, 0.9], B), jnp.float32),
              min_p=jnp.asarray(r.choice([0.0, 0.05], B), jnp.float32))
    jl, jd = jnp.asarray(x, jnp.float32), jnp.ones((B, bs - 1), jnp.int32)
    got = verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(8, 512), **kw)
    want = verify_xla.verify_accept(jl, jd, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    assert len(np.unique(np.asarray(got.tokens)[:, 0])) > 10


# ---------------------------------------------------------------------------------------------
# Errors and TPU compile.

def test_bad_filter_arguments_raise():
    x = jnp.zeros((2, 3, 10), jnp.float32)
    d = jnp.zeros((2, 2), jnp.int32)
    base = dict(temperature=jnp.ones((2,)), seed=jnp.zeros((2,), jnp.int32))
    bad = [dict(top_k=jnp.array([-1, 0], jnp.int32)), dict(top_k=jnp.ones((3,), jnp.int32)),
           dict(top_k=jnp.ones((2,))), dict(top_p=jnp.array([0.0, 1.0])),
           dict(top_p=jnp.array([1.5, 1.0])), dict(top_p=jnp.array([0.5, np.nan])),
           dict(min_p=jnp.array([1.0, 0.0])), dict(min_p=jnp.array([-0.1, 0.0])),
           dict(min_p=jnp.ones((2,), jnp.int32)), dict(top_logprobs=3),
           dict(return_logprobs=True, top_logprobs=21), dict(return_logprobs=1),
           dict(return_logprobs=True, top_logprobs=11)]            # > V
    for fn in (verify_accept, verify_xla.verify_accept):
        for over in bad:
            with pytest.raises(ValueError):
                fn(x, d, **(base | over))


def _filtered_call(chip, logits, drafts, t, seed, k, p, m):
    return verify_accept(logits, drafts, temperature=t, seed=seed, top_k=k, top_p=p, min_p=m,
                         return_logprobs=True, interpret=False, chip=chip)


@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_filters_compile_for_tpu(chip, dtype):
    S = jax.ShapeDtypeStruct
    B, bs, V = 8, 16, 151936
    compiled = aot_compile(functools.partial(_filtered_call, chip), S((B, bs, V), dtype),
                           S((B, bs - 1), jnp.int32), S((B,), jnp.float32), S((B,), jnp.int32),
                           S((B,), jnp.int32), S((B,), jnp.float32), S((B,), jnp.float32),
                           chip=chip)
    text = compiled.as_text()
    assert "verify_filters" in text and "verify_accept" in text
