"""The verify/accept kernel (and its plain-jnp twin) against the NumPy reference.

Greedy: exact integer equality with the reference and with a plain jnp.argmax scan. Sampling:
token-for-token equality with the reference for fixed seeds (same random stream), independence of
batch order and padding, and chi-square tests of the emitted tokens against the target
distribution (>= 20,000 draws, with the plain-jnp twin: B rows with different seeds are
independent draws; the kernel is shown equal to it and to the reference on its own cases).
"""
import functools
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from scipy import stats

from pallas_ops.execution import race_check_params, races_found
from pallas_ops.verify import xla as verify_accept_xla
from pallas_ops.verify import VerifyAcceptBlockSizes, VerifyResult, verify_accept
from reference import verify as ref
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

DTYPES = [jnp.float32, jnp.bfloat16]
PROFILE = os.environ.get("PALLAS_DFLASH_PROFILE", "ci")
# Expensive extras: run only in the thorough profile.
slow = [pytest.mark.slow,
        pytest.mark.skipif(PROFILE != "thorough", reason="thorough profile only")]


def n_examples(ci_count):
    """Hypothesis examples of an interpreted-kernel test (each new shape compiles the
    interpreter program, ~10 s on this machine): bounded under `ci`, 10x under thorough."""
    return ci_count if PROFILE == "ci" else 10 * ci_count
ALPHA = 1e-6          # per chi-square test: a false failure of the module is rarer than 1e-4


def _blocks(B, bb, tv, splits=1):
    bb = max(d for d in range(1, bb + 1) if B % d == 0)
    return VerifyAcceptBlockSizes(bb, tv, splits)


def make_case(seed, B, bs, V, dtype, *, mode="random", ties=False, neg_inf=False,
              sampling=False, probs=False, pad=0):
    """Inputs as numpy arrays (logits already rounded to dtype), plus kwargs for the calls.

    mode: 'random' drafts (argmax with prob. 0.7, else random / -1 / >= V), 'accept' (drafts =
    the rows' argmax: all accepted when greedy) or 'reject' (first draft wrong). pad: extra
    NaN-filled padding sequences after the B real ones (num_seqs = B)."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(B, bs, V)) * 3
    if ties:   # copy each row's max to another index (before or after it)
        am = x.argmax(-1)
        other = r.integers(0, V, size=(B, bs))
        np.put_along_axis(x, other[..., None], np.take_along_axis(x, am[..., None], -1), -1)
    if neg_inf:
        x[r.random(x.shape) < 0.3] = -np.inf
        x[..., 0] = np.where(np.isinf(x[..., 0]), -1.0, x[..., 0])   # keep a finite entry
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)).astype(np.float64)
    am = x.argmax(-1).astype(np.int32)                   # lowest index among ties
    d = am[:, :-1].copy()
    if mode == "random":
        u = r.random(d.shape)
        d = np.where(u < 0.7, d, r.integers(-1, V + 2, size=d.shape)).astype(np.int32)
        d[r.random(d.shape) < 0.05] = -1
    elif mode == "reject" and bs > 1:
        d[:, 0] = (am[:, 0] + 1 + r.integers(0, V - 1, size=B)) % V if V > 1 else -1
    kw = {}
    if sampling:
        t = r.uniform(0.3, 2.0, size=B).astype(np.float32)
        t[r.random(B) < 0.3] = 0.0                        # rows may mix greedy and sampling
        kw = dict(temperature=t, seed=r.integers(-2 ** 31, 2 ** 31 - 1, B).astype(np.int32),
                  position=r.integers(0, 2 ** 20, B).astype(np.int32))
        if mode == "accept":   # drafts = the samples themselves: deep acceptance when sampling
            d = _samples(x, **kw)[:, :-1]
    if probs:
        q = r.dirichlet(np.full(V, 0.5), size=(B, bs - 1))
        kw["draft_probs"] = q.astype(np.float32)
    logits = x.astype(np.float32)
    if pad:
        logits = np.concatenate([logits, np.full((pad, bs, V), np.nan, np.float32)])
        d = np.concatenate([d, np.full((pad, bs - 1), 7, np.int32)])
        for k, val in list(kw.items()):
            fill = np.nan if val.dtype.kind == "f" else 3
            kw[k] = np.concatenate([val, np.full((pad,) + val.shape[1:], fill, val.dtype)])
        kw["num_seqs"] = B
    return logits, d, kw


def _samples(x, temperature, seed, position):
    """Per-row samples x_j of the reference's stream (greedy rows: argmax)."""
    from reference import rng
    B, bs, V = x.shape
    out = np.zeros((B, bs), np.int32)
    for b in range(B):
        for j in range(bs):
            if temperature[b] > 0:
                g = rng.gumbel(rng.bits(rng.row_key(seed[b], position[b] + j), np.arange(V)))
                out[b, j] = np.argmax(x[b, j] / temperature[b] + g)
            else:
                out[b, j] = np.argmax(x[b, j])
    return out


def _to_jnp(logits, d, kw, dtype):
    jkw = {k: (jnp.asarray(v) if not isinstance(v, int) else v) for k, v in kw.items()}
    if "draft_probs" in jkw:
        jkw["draft_probs"] = jkw["draft_probs"].astype(dtype)
    return jnp.asarray(logits, dtype), jnp.asarray(d), jkw


def _ref_kw(kw, dtype):
    out = dict(kw)
    if "draft_probs" in out:   # the kernel sees q in the logits dtype: give the reference the same
        out["draft_probs"] = np.asarray(jnp.asarray(out["draft_probs"], dtype).astype(jnp.float32))
    return out


def assert_same(got, want):
    assert isinstance(got, VerifyResult)
    np.testing.assert_array_equal(np.asarray(got.num_accepted), want.num_accepted)
    np.testing.assert_array_equal(np.asarray(got.tokens), want.tokens)
    assert got.num_accepted.dtype == jnp.int32 and got.tokens.dtype == jnp.int32


def plain_greedy(logits, drafts):
    """A straightforward jnp.argmax + scan, independent of both implementations."""
    am = np.asarray(jnp.argmax(jnp.asarray(logits, jnp.float32), axis=-1))
    B, bs = am.shape
    a = np.zeros(B, np.int32)
    toks = np.full((B, bs), -1, np.int32)
    for b in range(B):
        k = 0
        while k < bs - 1 and drafts[b, k] == am[b, k]:
            k += 1
        a[b] = k
        toks[b, :k + 1] = am[b, :k + 1]
    return a, toks


# ---------------------------------------------------------------------------------------------
# Greedy.

@settings(max_examples=n_examples(5))
@given(data=st.data())
def test_greedy_matches_reference_and_argmax(data):
    B = data.draw(st.integers(1, 4))
    bs = data.draw(st.sampled_from([2, 5, 16, 32]) if PROFILE == "ci" else st.integers(2, 32))
    V = data.draw(st.sampled_from([5, 128, 200, 384, 777, 1000]))
    dtype = data.draw(st.sampled_from(DTYPES))
    mode = data.draw(st.sampled_from(["random", "accept", "reject"]))
    ties = data.draw(st.booleans())
    neg_inf = data.draw(st.booleans())
    bsz = _blocks(B, data.draw(st.sampled_from([1, 2, 4])), data.draw(st.sampled_from([128, 256])),
                  data.draw(st.sampled_from([1, 2])))      # 2: the vocabulary over two cores
    logits, d, kw = make_case(data.draw(st.integers(0, 2 ** 16)), B, bs, V, dtype, mode=mode,
                              ties=ties, neg_inf=neg_inf)
    want = ref.verify_accept(logits, d)
    if mode == "accept":
        assert (want.num_accepted == bs - 1).all()
    if mode == "reject":
        assert (want.num_accepted == 0).all()
    got = verify_accept(*_to_jnp(logits, d, kw, dtype)[:2], block_sizes=bsz)
    assert_same(got, want)
    a, toks = plain_greedy(jnp.asarray(logits, dtype), d)
    np.testing.assert_array_equal(a, want.num_accepted)
    np.testing.assert_array_equal(toks, want.tokens)
    assert_same(verify_accept_xla.verify_accept(jnp.asarray(logits, dtype), jnp.asarray(d)), want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float32, marks=slow)])
def test_greedy_full_vocab(dtype):
    """Qwen3-sized vocabulary (151936 = 1187 x 128: no tile divides it), default block sizes."""
    logits, d, _ = make_case(1, 1, 3, 151936, dtype, mode="accept", ties=True)
    logits[0, 2, 151935] = 1e4                            # the bonus is the very last entry
    want = ref.verify_accept(logits, d)
    assert want.tokens[0, 2] == 151935
    assert_same(verify_accept(jnp.asarray(logits, dtype), jnp.asarray(d)), want)


# Greedy ties: the contract is exactly jnp.argmax (lowest index among equal maxima), wherever the
# tied entries sit: the same lane of different 128-lane chunks, different vocabulary tiles (grid
# steps), different lanes of one chunk, the masked tail tile. Expected tokens are written from
# that contract by hand, not computed by any implementation.
TIE_V = 151936                # Qwen3's vocabulary: 1187 chunks of 128 lanes, no tile divides it
TIE_ROWS = {                  # (sequence, row): the tied indices of that row's maximum
    (0, 0): (300, 300 + 128 * 7, 300 + 128 * 500),    # same lane, across chunks and tiles
    (0, 1): (5, 3),                                   # two lanes of one chunk
    (0, 2): (TIE_V - 1, 129),                         # tail tile against the second chunk
    (0, 3): (TIE_V - 1, TIE_V - 2),                   # two lanes of the tail tile (the bonus row)
    (1, 0): (300 + 128 * 500, 300),                   # the draft names the higher tied index
    (1, 1): (1000, 999), (1, 2): (7, 8), (1, 3): (9, 10),
}
TIE_DRAFTS = [[300, 3, 129],            # each the lowest tied index: all three accepted
              [300 + 128 * 500, 999, 7]]  # a tied index, but not the lowest: rejected at once
TIE_ACCEPTED = [3, 0]
TIE_TOKENS = [[300, 3, 129, TIE_V - 2], [300, -1, -1, -1]]


def _tie_logits(dtype):
    r = np.random.default_rng(11)
    x = np.clip(r.normal(size=(2, 4, TIE_V)), -8, 8)   # all below the tied maximum 16
    for (b, j), idx in TIE_ROWS.items():
        x[b, j, list(idx)] = 16.0                      # exact in bf16 and f32
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["kernel", "kernel-8192-tiles", "kernel-2-splits", "xla",
                                  "reference"])
def test_greedy_ties_resolve_to_the_lowest_index(impl, dtype):
    logits = _tie_logits(dtype)
    drafts = jnp.asarray(TIE_DRAFTS, jnp.int32)
    # The contract first: jnp.argmax agrees with the hand-written tokens.
    am = np.asarray(jnp.argmax(logits, axis=-1))
    for (b, j), idx in TIE_ROWS.items():
        assert am[b, j] == min(idx)
    if impl == "kernel":
        got = verify_accept(logits, drafts)
    elif impl == "kernel-8192-tiles":   # 19 vocabulary grid steps, one sequence per step
        got = verify_accept(logits, drafts, block_sizes=VerifyAcceptBlockSizes(1, 8192))
    elif impl == "kernel-2-splits":     # tiles 0-9 and 10-18 on two cores: row (0, 2) ties
        got = verify_accept(logits, drafts,   # across the split, split 1 has a step to spare
                            block_sizes=VerifyAcceptBlockSizes(1, 8192, vocab_splits=2))
    elif impl == "xla":
        got = verify_accept_xla.verify_accept(logits, drafts)
    else:
        got = ref.verify_accept(np.asarray(logits.astype(jnp.float32)), np.asarray(drafts))
    np.testing.assert_array_equal(np.asarray(got.num_accepted), TIE_ACCEPTED)
    np.testing.assert_array_equal(np.asarray(got.tokens), TIE_TOKENS)


def _tied_sampling_case(seed=12345, position=77, V=1000):
    """f32 logits at T = 1 whose Gumbel-max scores x - log(-log(u)) tie exactly in f32, for a
    pair of indices in the same lane of different 128-lane chunks (and different 128-entry
    vocabulary tiles), in both rows; every other score is far below. The f32 scores are
    computed with the same jnp ops both implementations use (the float64 reference sees no tie,
    so the contract is checked by hand: the lower index of the tied pair)."""
    from pallas_ops import rng as jrng

    ties = [(5, 5 + 128 * 3), (200, 200 + 128 * 5)]
    x = np.full((1, len(ties), V), -30.0, np.float32)
    for j, (lo, hi) in enumerate(ties):
        key = jrng.row_key(jnp.int32(seed), jnp.int32(position + j))
        u = jrng.uniform(jrng.bits(key, jnp.arange(V, dtype=jnp.int32)))
        L = np.asarray(jnp.log(-jnp.log(u)))                    # score = x - L (in f32)
        x[0, j, lo] = 12.0
        s_lo = np.float32(x[0, j, lo] - L[lo])
        cand = np.float32(s_lo + L[hi])
        for _ in range(16):                                     # nearest x with an exact tie
            if np.float32(cand - L[hi]) == s_lo:
                break
            cand = np.nextafter(cand, np.float32(np.inf if cand - L[hi] < s_lo else -np.inf))
        assert np.float32(cand - L[hi]) == s_lo
        x[0, j, hi] = cand
    kw = dict(temperature=jnp.array([1.0], jnp.float32), seed=jnp.array([seed], jnp.int32),
              position=jnp.array([position], jnp.int32))
    return jnp.asarray(x), ties, kw


@pytest.mark.parametrize("impl", ["kernel", "kernel-128-tiles", "kernel-2-splits", "xla"])
def test_sampling_ties_resolve_to_the_lowest_index(impl):
    logits, ties, kw = _tied_sampling_case()
    drafts = jnp.asarray([[ties[0][0]]], jnp.int32)      # the lower tied index: accepted
    if impl == "kernel":
        got = verify_accept(logits, drafts, **kw)
    elif impl == "kernel-128-tiles":                     # the pair in different grid steps
        got = verify_accept(logits, drafts, block_sizes=VerifyAcceptBlockSizes(1, 128), **kw)
    elif impl == "kernel-2-splits":                      # row 1's pair on different cores
        got = verify_accept(logits, drafts, block_sizes=VerifyAcceptBlockSizes(1, 128, 2), **kw)
    else:
        got = verify_accept_xla.verify_accept(logits, drafts, **kw)
        # the tie is exact: one ulp more on the higher index and it wins
        x = np.asarray(logits).copy()
        for j, (_, hi) in enumerate(ties):
            x[0, j, hi] = np.nextafter(x[0, j, hi], np.float32(np.inf))
        up = verify_accept_xla.verify_accept(jnp.asarray(x), drafts, **kw)
        np.testing.assert_array_equal(np.asarray(up.tokens), [[ties[0][1], -1]])
    np.testing.assert_array_equal(np.asarray(got.num_accepted), [1])
    np.testing.assert_array_equal(np.asarray(got.tokens), [[ties[0][0], ties[1][0]]])


def test_sampling_full_vocab():
    """Sampling over 151936 entries: the noise of every tile, including the masked tail."""
    logits, d, kw = make_case(4, 2, 2, 151936, jnp.bfloat16, mode="accept", sampling=True)
    kw["temperature"][:] = [1.0, 0.5]
    d = _samples(logits, kw["temperature"], kw["seed"], kw["position"])[:, :1]
    want = ref.verify_accept(logits, d, **kw)
    np.testing.assert_array_equal(want.num_accepted, [1, 1])
    jl, jd, jkw = _to_jnp(logits, d, kw, jnp.bfloat16)
    assert_same(verify_accept(jl, jd, **jkw), want)


def test_nan_and_all_neg_inf_and_padding():
    logits, d, _ = make_case(2, 4, 3, 300, jnp.float32, mode="accept")
    logits[1, 2, 299] = np.nan          # in the masked tail tile
    logits[2, 0, :] = -np.inf
    bsz = VerifyAcceptBlockSizes(2, 128)
    want = ref.verify_accept(logits, d, num_seqs=3)
    np.testing.assert_array_equal(want.num_accepted, [2, 0, 0, 0])
    assert (want.tokens[1:] == -1).all()
    assert_same(verify_accept(jnp.asarray(logits), jnp.asarray(d), num_seqs=3, block_sizes=bsz),
                want)
    assert_same(verify_accept(jnp.asarray(logits), jnp.asarray(d), num_seqs=jnp.int32(3),
                              block_sizes=bsz), want)
    assert_same(verify_accept_xla.verify_accept(jnp.asarray(logits), jnp.asarray(d), num_seqs=3),
                want)


def test_padding_blocks_are_not_read():
    """Whole blocks of padding sequences are NaN: a read would make no difference to the output
    (padding rows are -1 anyway), so check the real rows next to them, and num_seqs = 0."""
    logits, d, kw = make_case(3, 2, 4, 200, jnp.bfloat16, mode="random", pad=6)
    bsz = VerifyAcceptBlockSizes(2, 128)
    want = ref.verify_accept(logits, d, num_seqs=2)
    assert_same(verify_accept(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(d), num_seqs=2,
                              block_sizes=bsz), want)
    got = verify_accept(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(d), num_seqs=0,
                        block_sizes=bsz)
    assert (np.asarray(got.tokens) == -1).all() and (np.asarray(got.num_accepted) == 0).all()


# ---------------------------------------------------------------------------------------------
# Sampling: the same stream as the reference.

@settings(max_examples=n_examples(4))
@given(data=st.data())
def test_sampling_matches_reference(data):
    B = data.draw(st.integers(1, 4))
    bs = data.draw(st.integers(2, 8))
    V = data.draw(st.sampled_from([5, 130, 300, 512]))
    dtype = data.draw(st.sampled_from(DTYPES))
    mode = data.draw(st.sampled_from(["random", "accept", "reject"]))
    probs = data.draw(st.booleans())
    pad = data.draw(st.sampled_from([0, 0, 2]))
    bsz = _blocks(B + pad, data.draw(st.sampled_from([1, 2])), 128,
                  data.draw(st.sampled_from([1, 2])))
    logits, d, kw = make_case(data.draw(st.integers(0, 2 ** 16)), B, bs, V, dtype, mode=mode,
                              neg_inf=data.draw(st.booleans()), sampling=True, probs=probs,
                              pad=pad)
    want = ref.verify_accept(np.asarray(jnp.asarray(logits, dtype).astype(jnp.float32)), d,
                             **_ref_kw(kw, dtype))
    jl, jd, jkw = _to_jnp(logits, d, kw, dtype)
    assert_same(verify_accept(jl, jd, block_sizes=bsz, **jkw), want)
    assert_same(verify_accept_xla.verify_accept(jl, jd, **jkw), want)


def test_kernel_draft_probs_with_rejections_matches_reference():
    """The kernel's draft_probs path (online log-sum-exp over three vocabulary tiles whose
    maximum grows tile by tile, then the accept test and the residual sample) on a batch where
    drafts are often rejected: equal to the reference token for token."""
    r = np.random.default_rng(17)
    B, bs, V = 16, 4, 300
    x = r.normal(size=(B, bs, V)) + np.linspace(0.0, 4.0, V)   # later tiles hold the max
    q = r.dirichlet(np.full(V, 0.3), size=(B, bs - 1))
    d = np.stack([[r.choice(V, p=q[b, j]) for j in range(bs - 1)] for b in range(B)])
    logits = x.astype(np.float32)
    kw = dict(temperature=np.full(B, 0.9, np.float32), seed=np.arange(B, dtype=np.int32) + 5,
              position=np.full(B, 33, np.int32), draft_probs=q.astype(np.float32))
    want = ref.verify_accept(logits, d.astype(np.int32), **kw)
    assert (want.num_accepted < bs - 1).sum() >= B // 2 and (want.num_accepted > 0).any()
    jl, jd, jkw = _to_jnp(logits, d.astype(np.int32), kw, jnp.float32)
    assert_same(verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(8, 128), **jkw), want)


@pytest.mark.parametrize("impl", ["kernel", "xla"])
def test_draft_probs_invalid_drafts_are_rejected(impl):
    """Drafts outside [0, V) (-1, V, V + 1, int32 max) with draft_probs: rejected at once and
    never used as an index; the token is x_0, the sample of p (not a residual sample). q puts
    most of its mass on p's likely tokens, so a residual sample would differ from x_0."""
    r = np.random.default_rng(19)
    B, bs, V = 16, 2, 200
    x = (r.normal(size=(B, bs, V)) * 2).astype(np.float32)
    top = np.argsort(x[:, 0], axis=-1)[:, -4:]
    q = np.full((B, 1, V), 0.2 / (V - 4))
    np.put_along_axis(q[:, 0], top, 0.2, axis=-1)
    d = np.array([-1, V, V + 1, 2 ** 31 - 1] * (B // 4), np.int32)[:, None]
    kw = dict(temperature=np.full(B, 1.0, np.float32), seed=np.arange(B, dtype=np.int32),
              position=np.full(B, 3, np.int32), draft_probs=q.astype(np.float32))
    want = ref.verify_accept(x, d, **kw)
    np.testing.assert_array_equal(want.num_accepted, np.zeros(B))
    np.testing.assert_array_equal(want.tokens[:, 0], _samples(x.astype(np.float64),
                                                              kw["temperature"], kw["seed"],
                                                              kw["position"])[:, 0])
    jl, jd, jkw = _to_jnp(x, d, kw, jnp.float32)
    if impl == "kernel":
        got = verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(8, 128), **jkw)
    else:
        got = verify_accept_xla.verify_accept(jl, jd, **jkw)
    assert_same(got, want)


@pytest.mark.parametrize("impl", ["kernel", "xla"])
def test_draft_probs_zero_probability_draft_is_rejected(impl):
    """A draft the target gives probability 0 is never accepted, even when the draft gave it
    probability 0 too (u * q(d) < p(d) is 0 < 0): the residual max(0, p - q) is sampled, here
    token 2 only. By hand, 16 seeds at once."""
    n = 16
    x = np.log(np.array([[0.5, 0.3, 0.2, 1.0], [0.25, 0.25, 0.25, 0.25]], np.float32))
    x[0, 3] = -np.inf                                       # token 3 impossible
    q = np.array([[0.5, 0.5, 0.0, 0.0]], np.float32)
    args = (jnp.asarray(np.broadcast_to(x, (n, 2, 4))), jnp.full((n, 1), 3, jnp.int32))
    kw = dict(temperature=jnp.ones((n,), jnp.float32), seed=jnp.arange(n, dtype=jnp.int32),
              position=jnp.full((n,), 4, jnp.int32),
              draft_probs=jnp.asarray(np.broadcast_to(q, (n, 1, 4))))
    if impl == "kernel":
        got = verify_accept(*args, block_sizes=VerifyAcceptBlockSizes(8, 128), **kw)
    else:
        got = verify_accept_xla.verify_accept(*args, **kw)
    np.testing.assert_array_equal(np.asarray(got.num_accepted), np.zeros(n))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.tile([2, -1], (n, 1)))


@pytest.mark.parametrize("probs", [False, True])
def test_sampling_batch_order_and_padding_independent(probs):
    """Real sequences permuted inside a padded batch (NaN padding after them) give the same
    tokens, permuted; equal to the reference on the unpadded batch."""
    B, bs, V, pad = 4, 5, 260, 4
    logits, d, kw = make_case(5, B, bs, V, jnp.float32, mode="accept", sampling=True,
                              probs=probs, pad=pad)
    kw["temperature"][:B] = np.array([0.7, 1.0, 0.0, 1.8], np.float32)
    bsz = VerifyAcceptBlockSizes(2, 128)
    want = ref.verify_accept(logits[:B], d[:B], **{k: (v[:B] if k != "num_seqs" else B)
                                                    for k, v in kw.items()})
    perm = np.concatenate([np.array([2, 0, 3, 1]), np.arange(B, B + pad)])
    for order in (np.arange(B + pad), perm):
        okw = {k: (v[order] if k != "num_seqs" else v) for k, v in kw.items()}
        jl, jd, jkw = _to_jnp(logits[order], d[order], okw, jnp.float32)
        got = verify_accept(jl, jd, block_sizes=bsz, **jkw)
        np.testing.assert_array_equal(np.asarray(got.tokens)[:B], want.tokens[order[:B]])
        np.testing.assert_array_equal(np.asarray(got.num_accepted)[:B],
                                      want.num_accepted[order[:B]])
        assert (np.asarray(got.tokens)[B:] == -1).all()
    assert (want.num_accepted > 0).any()


# ---------------------------------------------------------------------------------------------
# Sampling: the emitted tokens follow the target distribution (chi-square per position).

N_DRAWS = 20000


def _chi_square(counts, probs):
    """p-value of counts ~ Multinomial(probs), merging bins with expected count < 5."""
    n = counts.sum()
    exp = probs * n
    order = np.argsort(exp)
    c, e = counts[order].astype(float), exp[order]
    mc, me, acc_c, acc_e = [], [], 0.0, 0.0
    for ci, ei in zip(c, e):
        acc_c += ci
        acc_e += ei
        if acc_e >= 5:
            mc.append(acc_c)
            me.append(acc_e)
            acc_c = acc_e = 0.0
    if acc_e > 0 and me:
        mc[-1] += acc_c
        me[-1] += acc_e
    if len(me) < 2:
        return 1.0
    return stats.chisquare(mc, me).pvalue


def _target_rows(rng_, bs, V):
    x = rng_.normal(size=(bs, V)) * 1.5
    x[:, 1] += 2.5                                  # a likely token, drafted
    x[rng_.random((bs, V)) < 0.25] = -np.inf        # zero-probability tokens
    x[:, 1] = np.where(np.isinf(x[:, 1]), 2.0, x[:, 1])
    return x


def _check_positions(tokens, p, min_reached=500):
    B, bs = tokens.shape
    V = p.shape[1]
    for j in range(bs):
        reached = tokens[:, j] >= 0
        assert reached.sum() >= min_reached, (j, reached.sum())
        counts = np.bincount(tokens[reached, j], minlength=V)
        assert counts[p[j] == 0].sum() == 0, f"zero-probability token emitted at position {j}"
        pv = _chi_square(counts, p[j])
        assert pv > ALPHA, f"position {j}: chi-square p-value {pv:.3g}"


def _softmax(x):
    z = np.exp(x - x.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


@pytest.mark.parametrize("T", [0.8, 1.6])
def test_onehot_sampling_follows_target_distribution(T):
    r = np.random.default_rng(11)
    bs, V = 4, 9
    x = _target_rows(r, bs, V)
    p = _softmax(x / T)
    logits = jnp.asarray(np.broadcast_to(x, (N_DRAWS, bs, V)), jnp.float32)
    drafts = jnp.ones((N_DRAWS, bs - 1), jnp.int32)               # always draft token 1
    res = verify_accept_xla.verify_accept(
        logits, drafts, temperature=jnp.full((N_DRAWS,), T, jnp.float32),
        seed=jnp.arange(N_DRAWS, dtype=jnp.int32),
        position=jnp.asarray(r.integers(0, 2 ** 30, N_DRAWS), jnp.int32))
    tokens = np.asarray(res.tokens)
    _check_positions(tokens, p)
    # acceptance at position 0 happens exactly when the token is the draft
    acc = np.asarray(res.num_accepted)
    np.testing.assert_array_equal(acc > 0, tokens[:, 0] == 1)


def test_draft_probs_sampling_follows_target_distribution():
    r = np.random.default_rng(12)
    bs, V, T = 4, 9, 1.0
    x = _target_rows(r, bs, V)
    p = _softmax(x / T)
    q = r.dirichlet(np.full(V, 0.7), size=bs - 1)
    q[:, 1] += 1.0                                  # a draft that likes token 1, and others
    q /= q.sum(-1, keepdims=True)
    # drafts really are samples of q (the speculative-sampling guarantee needs that)
    drafts = np.stack([r.choice(V, size=N_DRAWS, p=q[j]) for j in range(bs - 1)], 1)
    res = verify_accept_xla.verify_accept(
        jnp.asarray(np.broadcast_to(x, (N_DRAWS, bs, V)), jnp.float32),
        jnp.asarray(drafts, jnp.int32), temperature=jnp.full((N_DRAWS,), T, jnp.float32),
        seed=jnp.arange(N_DRAWS, dtype=jnp.int32) * 3 + 1,
        position=jnp.asarray(r.integers(0, 2 ** 30, N_DRAWS), jnp.int32),
        draft_probs=jnp.asarray(np.broadcast_to(q, (N_DRAWS, bs - 1, V)), jnp.float32))
    tokens = np.asarray(res.tokens)
    _check_positions(tokens, p)
    # acceptance rate at position 0 is sum(min(p, q)) (binomial, 6 sigma)
    acc0 = (np.asarray(res.num_accepted) > 0).mean()
    rate = np.minimum(p[0], q[0]).sum()
    assert abs(acc0 - rate) < 6 * np.sqrt(rate * (1 - rate) / N_DRAWS)


def test_kernel_sampling_large_batch_equals_xla():
    """The kernel on a batch of many independent draws equals the plain-jnp twin draw for draw
    (so the statistical tests above speak for the kernel too)."""
    r = np.random.default_rng(13)
    B, bs, V = 64, 3, 9
    x = np.broadcast_to(_target_rows(r, bs, V), (B, bs, V)).astype(np.float32)
    kw = dict(temperature=jnp.full((B,), 0.9, jnp.float32),
              seed=jnp.arange(B, dtype=jnp.int32), position=jnp.full((B,), 77, jnp.int32))
    d = jnp.ones((B, bs - 1), jnp.int32)
    got = verify_accept(jnp.asarray(x), d, block_sizes=VerifyAcceptBlockSizes(8, 128), **kw)
    want = verify_accept_xla.verify_accept(jnp.asarray(x), d, **kw)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.num_accepted), np.asarray(want.num_accepted))
    assert len(np.unique(np.asarray(got.tokens)[:, 0])) > 2      # really random across seeds


# ---------------------------------------------------------------------------------------------
# Interpreter race checks, static errors, TPU compile.



@pytest.mark.parametrize("mode", ["on_wait", "eager"])
@pytest.mark.parametrize("sampling, splits", [(True, 1), (True, 2),
                                              pytest.param(False, 1, marks=slow)])
def test_no_races(mode, sampling, splits):
    logits, d, kw = make_case(21, 4, 3, 300, jnp.bfloat16, mode="random", sampling=sampling,
                              pad=2)
    jl, jd, jkw = _to_jnp(logits, d, kw, jnp.bfloat16)
    got = verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(2, 128, splits),
                        interpret=race_check_params(mode), **jkw)
    jax.block_until_ready(got)
    assert not races_found()
    want = ref.verify_accept(np.asarray(jl.astype(jnp.float32)), d, **_ref_kw(kw, jnp.bfloat16))
    assert_same(got, want)


def test_static_errors():
    x = jnp.zeros((2, 3, 10), jnp.float32)
    d = jnp.zeros((2, 2), jnp.int32)
    bad = [
        dict(logits=jnp.zeros((2, 3), jnp.float32)),
        dict(logits=jnp.zeros((2, 3, 10), jnp.int32)),
        dict(draft_tokens=jnp.zeros((2, 3), jnp.int32)),
        dict(draft_tokens=jnp.zeros((2, 2), jnp.float32)),
        dict(temperature=jnp.ones((3,))),
        dict(temperature=jnp.ones((2,))),                         # seed missing
        dict(temperature=jnp.ones((2,)), seed=jnp.ones((2,), jnp.float32)),
        dict(draft_probs=jnp.ones((2, 3, 10))),
        dict(num_seqs=3),
        dict(block_sizes=VerifyAcceptBlockSizes(3, 128)),         # does not divide B
        dict(block_sizes=(1, 128)),
    ]
    for over in bad:
        args = dict(logits=x, draft_tokens=d) | over
        with pytest.raises(ValueError):
            verify_accept(args.pop("logits"), args.pop("draft_tokens"), **args)
    with pytest.raises(ValueError):
        VerifyAcceptBlockSizes(1, 100)
    with pytest.raises(ValueError):
        VerifyAcceptBlockSizes(0, 128)
    with pytest.raises(ValueError):
        VerifyAcceptBlockSizes(1, 128, vocab_splits=3)


def test_default_block_sizes_split_the_vocabulary_on_megacore_at_batch_one():
    """One sequence block on v5p (two TensorCores): the vocabulary in two runs of an equal
    number of tiles; never on a one-core chip, never when there are blocks for both cores."""
    from pallas_ops.verify.block_sizes import default_block_sizes

    for B, bs, V in ((1, 10, 128256), (1, 16, 151936), (1, 3, 1000)):
        b = default_block_sizes(B, bs, V, 2, "v5p")
        tiles = -(-V // b.vocab_tile)
        assert b.vocab_splits == 2 and tiles % 2 == 0 and b.vocab_tile % 128 == 0, b
        assert default_block_sizes(B, bs, V, 2, "v5e").vocab_splits == 1
        assert default_block_sizes(B, bs, V, 2, "v6e").vocab_splits == 1
    assert default_block_sizes(64, 16, 151936, 2, "v5p").vocab_splits == 1
    assert default_block_sizes(2, 16, 151936, 2, "v5p").vocab_splits == 1
    assert default_block_sizes(1, 16, 128, 2, "v5p").vocab_splits == 1   # one tile: no split


def _specs(B, bs, V, dtype, sampling, probs=False):
    S = jax.ShapeDtypeStruct
    args = [S((B, bs, V), dtype), S((B, bs - 1), jnp.int32)]
    if sampling:
        args += [S((B,), jnp.float32), S((B,), jnp.int32), S((B,), jnp.int32)]
    if probs:
        args.append(S((B, bs - 1, V), dtype))
    return args


def _call(chip, *a):
    kw = {}
    if len(a) > 2:
        kw = dict(temperature=a[2], seed=a[3], position=a[4])
    if len(a) > 5:
        kw["draft_probs"] = a[5]
    return verify_accept(a[0], a[1], interpret=False, chip=chip, **kw)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("B,bs,V", [(64, 16, 151936), (1, 10, 128256)])
@pytest.mark.parametrize("sampling", [False, True])
def test_compiles_for_tpu(chip, B, bs, V, sampling):
    compiled = aot_compile(functools.partial(_call, chip),
                           *_specs(B, bs, V, jnp.bfloat16, sampling), chip=chip)
    assert "verify_accept" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", ["v5p"])
def test_draft_probs_compiles_for_tpu(chip):
    compiled = aot_compile(functools.partial(_call, chip),
                           *_specs(8, 16, 151936, jnp.bfloat16, True, probs=True), chip=chip)
    assert "verify_accept" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_vocab_sharded_compiles_for_a_4_chip_slice(chip):
    """verify_accept on vocabulary shards inside shard_map over a 4-chip slice (Qwen3 vocab,
    B=64, bs=16, sampling): Mosaic compiles it, and the one collective is an all-gather of
    per-row scalars (no gather of logits: nothing of vocabulary size crosses the chips)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from tests.tpu_harness import require_libtpu

    require_libtpu()
    from jax.experimental import topologies

    from pallas_ops.chips import CHIPS

    devs = topologies.get_topology_desc(platform="tpu", topology_name=CHIPS[chip].topology).devices
    mesh = Mesh(np.array(devs[:4]), ("model",))
    B, bs, V = 64, 16, 151936

    def local(lg, d, t, s, pos):
        return verify_accept(lg, d, temperature=t, seed=s, position=pos, interpret=False,
                             chip=chip, vocab_axis_name="model")

    f = jax.jit(jax.shard_map(local, mesh=mesh, out_specs=P(), check_vma=False,
                              in_specs=(P(None, None, "model"), P(), P(), P(), P())))
    sh = lambda spec: NamedSharding(mesh, spec)   # noqa: E731
    args = [jax.ShapeDtypeStruct((B, bs, V), jnp.bfloat16, sharding=sh(P(None, None, "model")))]
    args += [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh(P()))
             for x in _specs(B, bs, V, jnp.bfloat16, True)[1:]]
    hlo = f.lower(*args).compile().as_text()
    assert hlo.count("tpu_custom_call") == 1
    gathers = [ln for ln in hlo.splitlines() if " all-gather(" in ln]
    assert len(gathers) == 1 and "all-reduce(" not in hlo, gathers
    assert f"s32[{4 * 3},{B},{bs}]" in gathers[0]   # shards x (score, index, NaN) x rows


@pytest.mark.parametrize("sampling", [False, True])
def test_block_size_one(sampling):
    """bs = 1: no drafts, the token is the target's argmax / sample at the block's position."""
    logits, d, kw = make_case(31, 2, 1, 200, jnp.float32, sampling=sampling)
    want = ref.verify_accept(logits, d, **kw)
    jl, jd, jkw = _to_jnp(logits, d, kw, jnp.float32)
    assert_same(verify_accept(jl, jd, block_sizes=VerifyAcceptBlockSizes(1, 128), **jkw), want)
    assert_same(verify_accept_xla.verify_accept(jl, jd, **jkw), want)
    assert (want.tokens[:, 0] >= 0).all()
