"""The verify/accept NumPy reference and the random stream, on small hand-checked cases."""
import jax
import numpy as np
import pytest

from pallas_ops import rng as jrng
from reference import rng
from reference.verify import VerifyResult, verify_accept

NEG = -np.inf


def _logits(rows, V):
    """[1, len(rows), V] logits with row j peaked at rows[j] (value 5, others 0)."""
    x = np.zeros((1, len(rows), V), np.float32)
    for j, t in enumerate(rows):
        x[0, j, t] = 5.0
    return x


def _check(res, a, tokens):
    assert isinstance(res, VerifyResult)
    np.testing.assert_array_equal(res.num_accepted, a)
    np.testing.assert_array_equal(res.tokens, tokens)
    assert res.num_accepted.dtype == np.int32 and res.tokens.dtype == np.int32


# ---------------------------------------------------------------------------------------------
# The random stream.

def test_rng_golden_values():
    """Pin the stream: changing it silently would change every sampled token."""
    assert int(rng.row_key(1, 2)) == 3709601638
    np.testing.assert_array_equal(rng.bits(rng.row_key(1, 2), np.arange(4)),
                                  [2105537509, 3814444473, 2096180949, 1665288466])
    assert int(rng.row_key(-7, 2 ** 31 - 1, 1)) == 3344353428


def test_rng_jnp_twin_bit_for_bit():
    seed = np.array([0, 1, -5, 2 ** 31 - 1, -2 ** 31], np.int32)[:, None]
    pos = np.array([0, 7, 123456, 2 ** 31 - 1, -1], np.int32)[:, None]
    idx = np.arange(0, 300000, 37, dtype=np.int32)[None]
    for stream in (0, 1):
        kj = np.asarray(jax.jit(lambda s, p: jrng.row_key(s, p, stream))(seed, pos))
        kn = rng.row_key(seed, pos, stream)
        np.testing.assert_array_equal(kj.view(np.uint32), kn)
        bj = np.asarray(jax.jit(jrng.bits)(kj, idx)).view(np.uint32)
        np.testing.assert_array_equal(bj, rng.bits(kn, idx))
        # premultiplied form used inside the kernel
        pm = (idx.astype(np.int64) * rng.INDEX_MUL.astype(np.int64)) & 0xFFFFFFFF
        pm = pm.astype(np.uint32).view(np.int32)
        np.testing.assert_array_equal(np.asarray(jrng.bits_premul(kj, pm)).view(np.uint32),
                                      rng.bits(kn, idx))
        uj = np.asarray(jrng.uniform(bj.view(np.int32))).astype(np.float64)
        np.testing.assert_array_equal(uj, rng.uniform(bj))            # exact in f32 and f64
        np.testing.assert_allclose(np.asarray(jrng.gumbel(bj.view(np.int32))), rng.gumbel(bj),
                                   rtol=1e-5, atol=1e-5)


def test_rng_uniform_range_and_moments():
    b = rng.bits(rng.row_key(3, 4), np.arange(200000))
    u = rng.uniform(b)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / u.size)
    g = rng.gumbel(b)
    assert abs(g.mean() - np.euler_gamma) < 0.02 and abs(g.var() - np.pi ** 2 / 6) < 0.05
    # distinct within a row (index -> bits is a bijection for a fixed key)
    assert np.unique(b).size == b.size
    # extremes of the 23-bit grid
    assert rng.uniform(np.uint32(0)) == 2.0 ** -24
    assert rng.uniform(np.uint32(0xFFFFFFFF)) == 1 - 2.0 ** -24


# ---------------------------------------------------------------------------------------------
# Greedy.

def test_greedy_first_draft_rejected():
    x = _logits([3, 1, 2], V=6)
    _check(verify_accept(x, np.array([[4, 1]], np.int32)), [0], [[3, -1, -1]])


def test_greedy_all_accepted_plus_bonus():
    x = _logits([3, 1, 2], V=6)
    _check(verify_accept(x, np.array([[3, 1]], np.int32)), [2], [[3, 1, 2]])


def test_greedy_partial():
    x = _logits([3, 1, 2, 0], V=6)
    _check(verify_accept(x, np.array([[3, 5, 2]], np.int32)), [1], [[3, 1, -1, -1]])


def test_greedy_ties_lowest_index():
    x = np.zeros((1, 2, 5), np.float32)
    x[0, 0, [1, 3]] = 2.0     # tie between 1 and 3 -> 1
    x[0, 1, [4, 2]] = 7.0     # tie between 2 and 4 -> 2
    _check(verify_accept(x, np.array([[3]], np.int32)), [0], [[1, -1]])
    _check(verify_accept(x, np.array([[1]], np.int32)), [1], [[1, 2]])


def test_invalid_drafts_rejected_and_never_indexed():
    x = _logits([0, 1, 2], V=4)
    # -1 at the first draft; a draft >= V (4) cannot match; a large negative id
    _check(verify_accept(x, np.array([[-1, 1]], np.int32)), [0], [[0, -1, -1]])
    _check(verify_accept(x, np.array([[0, 4]], np.int32)), [1], [[0, 1, -1]])
    _check(verify_accept(x, np.array([[-2 ** 31, 1]], np.int32)), [0], [[0, -1, -1]])
    # a -1 after an accepted prefix stops the scan there
    _check(verify_accept(x, np.array([[0, -1]], np.int32)), [1], [[0, 1, -1]])


def test_neg_inf_logits_never_emitted_greedy():
    x = np.full((1, 2, 4), NEG, np.float32)
    x[0, 0, 2] = -50.0        # the only finite logit wins even though it is very negative
    x[0, 1, 3] = -1e30
    _check(verify_accept(x, np.array([[2]], np.int32)), [1], [[2, 3]])


def test_nan_row_fails_documented():
    x = _logits([1, 2], V=4)
    x[0, 1, 0] = np.nan       # NaN anywhere in the sequence's logits
    _check(verify_accept(x, np.array([[1]], np.int32)), [0], [[-1, -1]])
    t = np.array([1.0], np.float32)
    _check(verify_accept(x, np.array([[1]], np.int32), temperature=t, seed=np.array([3])),
           [0], [[-1, -1]])


def test_all_neg_inf_row_fails():
    x = _logits([1, 2], V=4)
    x[0, 1, :] = NEG
    _check(verify_accept(x, np.array([[1]], np.int32)), [0], [[-1, -1]])


def test_padding_rows():
    x = np.concatenate([_logits([1, 2], 4), np.full((2, 2, 4), np.nan, np.float32)])
    d = np.array([[1], [0], [0]], np.int32)
    _check(verify_accept(x, d, num_seqs=1), [1, 0, 0], [[1, 2], [-1, -1], [-1, -1]])
    _check(verify_accept(x[:1], d[:1], num_seqs=0), [0], [[-1, -1]])


def test_block_size_one():
    x = _logits([2], V=3)
    _check(verify_accept(x, np.zeros((1, 0), np.int32)), [0], [[2]])


def test_static_errors():
    x = _logits([1, 2], V=4)
    with pytest.raises(ValueError):
        verify_accept(x[0], np.array([[1]]))
    with pytest.raises(ValueError):
        verify_accept(x, np.array([[1, 2]]))
    with pytest.raises(ValueError):
        verify_accept(x, np.array([[1]]), temperature=np.array([1.0]))   # no seed


# ---------------------------------------------------------------------------------------------
# Sampling.

def test_sampling_is_gumbel_max_of_the_stream():
    """The sampled token is argmax(logits / T + G(seed, position + j, i)), by hand."""
    V, T, seed, pos = 7, 0.7, 11, 40
    x = np.random.default_rng(0).normal(size=(1, 3, V)).astype(np.float32)
    want = [int(np.argmax(x[0, j] / T + rng.gumbel_noise(seed, pos + j, np.arange(V))))
            for j in range(3)]
    d = np.array([[want[0], want[1]]], np.int32)                 # drafts agree: all accepted
    _check(verify_accept(x, d, temperature=np.array([T]), seed=np.array([seed]),
                         position=np.array([pos])), [2], [want])
    d = np.array([[want[0], (want[1] + 1) % V]], np.int32)       # second draft disagrees
    _check(verify_accept(x, d, temperature=np.array([T]), seed=np.array([seed]),
                         position=np.array([pos])), [1], [[want[0], want[1], -1]])


def test_sampling_never_emits_neg_inf_and_temperature_zero_is_greedy():
    V = 6
    x = np.zeros((1, 2, V), np.float32)
    x[0, :, [0, 2, 5]] = NEG
    seen = set()
    for s in range(300):
        r = verify_accept(x, np.array([[1]], np.int32), temperature=np.array([1.5]),
                          seed=np.array([s]))
        seen.update(int(t) for t in r.tokens[0] if t >= 0)
    assert seen == {1, 3, 4}
    g = verify_accept(_logits([4, 1], V), np.array([[4]], np.int32),
                      temperature=np.array([0.0]), seed=np.array([5]))
    _check(g, [1], [[4, 1]])


def test_draft_probs_hand_cases():
    x = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))[None].astype(
        np.float32)
    p0 = np.exp(x[0, 0].astype(np.float64))
    p0 /= p0.sum()
    kw = dict(temperature=np.array([1.0]), position=np.array([9]))
    # q == p: always accepted (u * q < p since u < 1)
    for s in range(20):
        r = verify_accept(x, np.array([[2]], np.int32), draft_probs=p0[None, None],
                          seed=np.array([s]), **kw)
        assert r.num_accepted[0] == 1 and r.tokens[0, 0] == 2
    # p(d) = 0 (token 0 made impossible): always rejected; the residual is p itself
    x2 = x.copy()
    x2[0, 0, 0] = NEG
    q = np.array([[[0.7, 0.1, 0.1, 0.1]]])
    for s in range(20):
        r = verify_accept(x2, np.array([[0]], np.int32), draft_probs=q, seed=np.array([s]), **kw)
        assert r.num_accepted[0] == 0 and r.tokens[0, 0] in (1, 2, 3)
    # the residual max(0, p - q) by hand, with the stream-0 noise of row 0
    q = np.array([[[0.1, 0.5, 0.3, 0.1]]])          # residual: token 3 only (0.4 - 0.1)
    for s in range(20):
        r = verify_accept(x, np.array([[1]], np.int32), draft_probs=q, seed=np.array([s]), **kw)
        u = rng.uniform(rng.bits(rng.row_key(s, 9, rng.STREAM_ACCEPT), 0))
        if u * 0.5 < p0[1]:
            assert r.num_accepted[0] == 1 and r.tokens[0, 0] == 1
        else:
            assert r.num_accepted[0] == 0 and r.tokens[0, 0] == 3


def test_draft_probs_impossible_draft_is_rejected_even_if_q_is_zero():
    """A draft with p(d) = 0 is never accepted, also when the draft gave it q(d) = 0 (u * 0 < 0 is
    false): the token is then a sample of the residual max(0, p - q), here token 2 only."""
    x = np.log(np.array([[0.5, 0.3, 0.2, 1.0], [0.25, 0.25, 0.25, 0.25]]))[None].astype(
        np.float32)
    x[0, 0, 3] = NEG                                # token 3 impossible
    q = np.array([[[0.5, 0.5, 0.0, 0.0]]])
    for s in range(20):
        r = verify_accept(x, np.array([[3]], np.int32), temperature=np.array([1.0]),
                          seed=np.array([s]), position=np.array([4]), draft_probs=q)
        _check(r, [0], [[2, -1]])
