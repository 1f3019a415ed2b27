"""The NumPy reference of ragged paged attention, on tiny cases checked by hand."""
import numpy as np
import pytest

from reference.paged import paged_attention, ragged_paged_attention, split_interleaved, write_kv_pages

D = 64


def _e(i, scale=1.0):
    x = np.zeros(D)
    x[i] = scale
    return x


def _pages(hkv, num_pages, page_size, fill=np.nan):
    return np.full((hkv, num_pages, page_size, D), fill), np.full((hkv, num_pages, page_size, D), fill)


def _i32(*xs):
    return [np.asarray(x, np.int32) for x in xs]


def test_two_key_softmax_by_hand():
    # One sequence, one query, two keys: logits 0 and ln 3 -> weights 1/4, 3/4.
    k, v = _pages(1, 2, 16)
    k[0, 1, 0], k[0, 1, 1] = 0.0, _e(0, np.log(3.0))
    v[0, 1, 0], v[0, 1, 1] = _e(0, 4.0), _e(1, 8.0)
    q = _e(0)[None, None]                                   # [T=1, Hq=1, D]
    kv_lens, table, cu, n = _i32([2], [[1]], [0, 1], 1)
    out = paged_attention(q, k, v, kv_lens, table, cu, n, sm_scale=1.0)
    np.testing.assert_allclose(out[0, 0], 0.25 * _e(0, 4.0) + 0.75 * _e(1, 8.0), rtol=1e-12)


def test_default_scale_is_inverse_sqrt_head_dim():
    k, v = _pages(1, 1, 16)
    k[0, 0, 0], k[0, 0, 1] = 0.0, _e(0, 8.0 * np.log(3.0))  # logit ln3 after 1/sqrt(64) = 1/8
    v[0, 0, 0], v[0, 0, 1] = _e(0), _e(1)
    kv_lens, table, cu, n = _i32([2], [[0]], [0, 1], 1)
    out = paged_attention(_e(0)[None, None], k, v, kv_lens, table, cu, n)
    np.testing.assert_allclose(out[0, 0], 0.25 * _e(0) + 0.75 * _e(1), rtol=1e-12)


def test_gqa_grouping():
    # Hkv = 2, G = 2: q heads 0, 1 read KV head 0; q heads 2, 3 read KV head 1. One key only, so
    # each output is that head's value exactly.
    k, v = _pages(2, 1, 16)
    k[:, 0, 0] = 1.0
    v[0, 0, 0], v[1, 0, 0] = _e(3, 5.0), _e(7, -2.0)
    q = np.ones((1, 4, D))
    kv_lens, table, cu, n = _i32([1], [[0]], [0, 1], 1)
    out = paged_attention(q, k, v, kv_lens, table, cu, n)
    for h in range(4):
        np.testing.assert_array_equal(out[0, h], v[h // 2, 0, 0])


def test_causal_alignment_at_the_end():
    # q_len 2, kv_len 3: query 0 sits at position 1 (sees keys 0, 1), query 1 at 2 (sees 0, 1, 2).
    # Zero queries make all logits equal, so outputs are plain means of the visible values.
    k, v = _pages(1, 1, 16)
    k[0, 0, :3] = 1.0
    v[0, 0, 0], v[0, 0, 1], v[0, 0, 2] = _e(0, 3.0), _e(1, 3.0), _e(2, 3.0)
    q = np.zeros((2, 1, D))
    kv_lens, table, cu, n = _i32([3], [[0]], [0, 2], 1)
    out = paged_attention(q, k, v, kv_lens, table, cu, n)
    np.testing.assert_allclose(out[0, 0], 1.5 * (_e(0) + _e(1)), rtol=1e-12)
    np.testing.assert_allclose(out[1, 0], _e(0) + _e(1) + _e(2), rtol=1e-12)


def test_padding_rows_and_padding_slots_are_zero():
    # Two slots, one in use; q has 3 rows, only row 0 is a query. Slot 1 holds garbage that must
    # not be read (its page index is far out of range).
    k, v = _pages(1, 1, 16)
    k[0, 0, 0], v[0, 0, 0] = 1.0, 2.0
    q = np.full((3, 1, D), np.nan)
    q[0] = 1.0
    kv_lens, table, cu, n = _i32([1, 7], [[0], [10 ** 9]], [0, 1, 3], [1])
    out = paged_attention(q, k, v, kv_lens, table, cu, n)
    np.testing.assert_array_equal(out[0, 0], np.full(D, 2.0))
    np.testing.assert_array_equal(out[1:], 0.0)


def test_soft_cap():
    # Logits 0 and 10 capped at 1: weights proportional to 1 and e^{tanh(10)}.
    k, v = _pages(1, 1, 16)
    k[0, 0, 0], k[0, 0, 1] = 0.0, _e(0, 10.0)
    v[0, 0, 0], v[0, 0, 1] = _e(0), _e(1)
    kv_lens, table, cu, n = _i32([2], [[0]], [0, 1], 1)
    out = paged_attention(_e(0)[None, None], k, v, kv_lens, table, cu, n, sm_scale=1.0,
                          soft_cap=1.0)
    w1 = np.exp(np.tanh(10.0)) / (1.0 + np.exp(np.tanh(10.0)))
    np.testing.assert_allclose(out[0, 0], (1 - w1) * _e(0) + w1 * _e(1), rtol=1e-12)
    # Cap 3: the capped logit is 3 tanh(10 / 3) (the factor c matters once c != 1).
    out = paged_attention(_e(0)[None, None], k, v, kv_lens, table, cu, n, sm_scale=1.0,
                          soft_cap=3.0)
    w1 = np.exp(3 * np.tanh(10.0 / 3)) / (1.0 + np.exp(3 * np.tanh(10.0 / 3)))
    np.testing.assert_allclose(out[0, 0], (1 - w1) * _e(0) + w1 * _e(1), rtol=1e-12)


def test_sliding_window():
    # Window 2: the query at position 4 sees keys 3 and 4 only; the keys before are NaN.
    k, v = _pages(1, 1, 16)
    k[0, 0, 3:5] = 0.0
    v[0, 0, 3], v[0, 0, 4] = _e(0, 2.0), _e(1, 2.0)
    kv_lens, table, cu, n = _i32([5], [[0]], [0, 1], 1)
    out = paged_attention(np.zeros((1, 1, D)), k, v, kv_lens, table, cu, n, sliding_window=2)
    np.testing.assert_allclose(out[0, 0], _e(0) + _e(1), rtol=1e-12)


def test_permuted_pages_give_the_same_result():
    rng = np.random.default_rng(0)
    ps, n_pages = 16, 3
    keys, vals = rng.standard_normal((2, 1, n_pages * ps, D))
    q = rng.standard_normal((4, 2, D))
    kv_lens, cu, n = _i32([40], [0, 4], 1)
    results = []
    for perm in ([0, 1, 2], [2, 0, 1], [4, 3, 1]):
        k, v = _pages(1, 5, ps)
        for slot, page in enumerate(perm):
            k[0, page], v[0, page] = keys[:, slot * ps:(slot + 1) * ps], vals[:, slot * ps:(slot + 1) * ps]
        table = np.asarray([perm + [10 ** 9]], np.int32)
        results.append(paged_attention(q, k, v, kv_lens, table, cu, n))
        assert not np.isnan(results[-1]).any()
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-12)


def test_write_kv_pages_places_rows():
    # Sequence 0: 2 new tokens ending at kv_len 17 (positions 15, 16: page slots 0 and 1).
    # Sequence 1: 1 new token at position 0. Row 3 of k_new is padding (not written).
    k, v = _pages(2, 4, 16, fill=0.0)
    k_new = np.arange(4 * 2 * D, dtype=np.float64).reshape(4, 2, D)
    kv_lens, table, cu, n = _i32([17, 1], [[3, 1], [2, 0]], [0, 2, 3], 2)
    k2, v2 = write_kv_pages(k, v, k_new, -k_new, kv_lens, table, cu, n)
    np.testing.assert_array_equal(k2[:, 3, 15], k_new[0])
    np.testing.assert_array_equal(k2[:, 1, 0], k_new[1])
    np.testing.assert_array_equal(k2[:, 2, 0], k_new[2])
    np.testing.assert_array_equal(v2[:, 2, 0], -k_new[2])
    written = np.zeros(k.shape, bool)
    written[:, 3, 15] = written[:, 1, 0] = written[:, 2, 0] = True
    assert np.all(k2[~written] == 0.0)


@pytest.mark.parametrize("num_seqs", [0, 1])
def test_zero_sequences_in_use(num_seqs):
    k, v = _pages(1, 1, 16, fill=1.0)
    kv_lens, table, cu = _i32([3], [[0]], [0, 3])
    out = paged_attention(np.ones((3, 1, D)), k, v, kv_lens, table, cu, np.int32(num_seqs))
    assert np.all(out == (1.0 if num_seqs else 0.0))


def test_ragged_interleaved_layout_and_scales_by_hand():
    # jax's layout [P, page_size, 2 * Hkv, D]: K of KV head h at combined head 2h, V at 2h + 1.
    # Two KV heads, one q head each; one query, two keys. Head 0: logits 0 and ln 3 (after
    # k_scale = 0.5 on a stored 2 ln 3), weights 1/4, 3/4. Head 1: equal logits, weights 1/2.
    # sm_scale defaults to 1.0 (jax's default), v_scale = 2 doubles the values.
    kv = np.full((1, 16, 4, D), np.nan)
    kv[0, :2] = 0.0
    kv[0, 1, 0] = _e(0, 2.0 * np.log(3.0))                  # K head 0, key 1
    kv[0, 0, 1], kv[0, 1, 1] = _e(0, 4.0), _e(1, 8.0)       # V head 0
    kv[0, 0, 3], kv[0, 1, 3] = _e(2, 1.0), _e(3, 3.0)       # V head 1 (its K stays 0)
    q = np.stack([_e(0), _e(0)])[None]                      # [T=1, Hq=2, D]
    kv_lens, table, cu, n = _i32([2], [[0]], [0, 1], [1])
    out = ragged_paged_attention(q, kv, kv_lens, table, cu, n, k_scale=0.5, v_scale=2.0)
    np.testing.assert_allclose(out[0, 0], 2.0 * (0.25 * _e(0, 4.0) + 0.75 * _e(1, 8.0)), rtol=1e-12)
    np.testing.assert_allclose(out[0, 1], 2.0 * (0.5 * _e(2) + 0.5 * _e(3, 3.0)), rtol=1e-12)
    # The split view is the same cache: K heads from the even combined heads, V from the odd.
    k, v = split_interleaved(kv)
    np.testing.assert_array_equal(k[1, 0, 1], kv[0, 1, 2])
    np.testing.assert_array_equal(v[0, 0, 1], kv[0, 1, 1])
