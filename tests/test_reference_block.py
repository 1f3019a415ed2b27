"""The block-attention reference on tiny hand-checked cases."""
import math

import numpy as np
import pytest

from reference.block import append_context, block_attention

NAN = float("nan")


def _caches(B, Hkv, S, D, fill=NAN):
    return np.full((B, Hkv, S, D), fill), np.full((B, Hkv, S, D), fill)


def test_ctx_len_zero_attends_to_the_block_only():
    # One head, D=1, bs=2: q=[1, 0], block keys [0, 1], values [10, 20]; NaN cache unused.
    q = np.array([1.0, 0.0]).reshape(1, 2, 1, 1)
    kb = np.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    vb = np.array([10.0, 20.0]).reshape(1, 2, 1, 1)
    kc, vc = _caches(1, 1, 4, 1)
    out = block_attention(q, kb, vb, kc, vc, np.array([0]), sm_scale=1.0)
    # query 0: scores [0, 1] -> weights [1, e]/(1+e); query 1: scores [0, 0] -> mean.
    w = math.e / (1 + math.e)
    np.testing.assert_allclose(out[0, 0, 0, 0], 10 * (1 - w) + 20 * w)
    np.testing.assert_allclose(out[0, 1, 0, 0], 15.0)


def test_two_key_softmax_by_hand():
    # One context key and one block key; D=2 so the default scale is 1/sqrt(2).
    q = np.array([2.0, 0.0]).reshape(1, 1, 1, 2)
    kb = np.array([0.0, 5.0]).reshape(1, 1, 1, 2)   # score 0
    vb = np.array([0.0, 1.0]).reshape(1, 1, 1, 2)
    kc, vc = _caches(1, 1, 3, 2)
    kc[0, 0, 0] = [1.0, 0.0]                        # score 2/sqrt(2) = sqrt(2)
    vc[0, 0, 0] = [1.0, 0.0]
    out = block_attention(q, kb, vb, kc, vc, np.array([1]))
    a = math.exp(math.sqrt(2.0))
    np.testing.assert_allclose(out[0, 0, 0], [a / (a + 1), 1 / (a + 1)])


def test_gqa_groups_share_their_kv_head():
    # Hq=4, Hkv=2: q heads 0,1 use kv head 0 (value 1), heads 2,3 kv head 1 (value 7).
    B, bs, D = 1, 1, 1
    q = np.zeros((B, bs, 4, D))
    kb = np.zeros((B, bs, 2, D))
    vb = np.array([1.0, 7.0]).reshape(B, bs, 2, D)
    kc, vc = _caches(B, 2, 2, D)
    kc[0, :, 0] = 0.0
    vc[0, 0, 0], vc[0, 1, 0] = 3.0, 9.0
    out = block_attention(q, kb, vb, kc, vc, np.array([1]))
    np.testing.assert_allclose(out[0, 0, :, 0], [2.0, 2.0, 8.0, 8.0])


def test_sliding_window_edges():
    # ctx_len 4, bs 2, W=3: query 0 (position 4) sees context keys > 1 -> {2, 3};
    # query 1 (position 5) sees context keys > 2 -> {3}. All scores 0 (q = 0): plain means.
    B, bs, D = 1, 2, 1
    q = np.zeros((B, bs, 1, D))
    kb = np.zeros((B, bs, 1, D))
    vb = np.array([100.0, 200.0]).reshape(B, bs, 1, D)
    kc, vc = _caches(B, 1, 6, D)
    kc[0, 0, :4] = 0.0
    vc[0, 0, :4, 0] = [1.0, 2.0, 3.0, 4.0]
    out = block_attention(q, kb, vb, kc, vc, np.array([4]), sliding_window=3)
    np.testing.assert_allclose(out[0, 0, 0, 0], (3 + 4 + 100 + 200) / 4)
    np.testing.assert_allclose(out[0, 1, 0, 0], (4 + 100 + 200) / 3)
    # W=1: no context at all; W large: all context.
    out1 = block_attention(q, kb, vb, kc, vc, np.array([4]), sliding_window=1)
    np.testing.assert_allclose(out1[0, :, 0, 0], [150.0, 150.0])
    out_big = block_attention(q, kb, vb, kc, vc, np.array([4]), sliding_window=100)
    np.testing.assert_allclose(out_big[0, :, 0, 0], [(10 + 300) / 6] * 2)


def test_append_then_attend_equals_longer_context():
    rng = np.random.default_rng(0)
    B, Hkv, S, D, n_max = 2, 1, 8, 2, 3
    kc, vc = _caches(B, Hkv, S, D)
    kc[:, :, :2] = rng.normal(size=(B, Hkv, 2, D))
    vc[:, :, :2] = rng.normal(size=(B, Hkv, 2, D))
    k_new = rng.normal(size=(B, n_max, Hkv, D))
    v_new = rng.normal(size=(B, n_max, Hkv, D))
    ctx, n_new = np.array([2, 1]), np.array([3, 0])
    kc2, vc2 = append_context(kc, vc, k_new, v_new, ctx, n_new)
    np.testing.assert_array_equal(kc2[0, 0, 2:5], k_new[0, :, 0])
    np.testing.assert_array_equal(vc2[0, 0, 2:5], v_new[0, :, 0])
    assert np.isnan(kc2[0, :, 5:]).all() and np.isnan(kc2[1, :, 2:]).all()  # untouched
    np.testing.assert_array_equal(kc2[1, :, :2], kc[1, :, :2])
    q = rng.normal(size=(B, 2, 1, D))
    kb, vb = rng.normal(size=(B, 2, Hkv, D)), rng.normal(size=(B, 2, Hkv, D))
    out = block_attention(q, kb, vb, kc2, vc2, ctx + n_new)
    # Same as attending over the explicit concatenation for sequence 0.
    keys = np.concatenate([kc[0, 0, :2], k_new[0, :, 0], kb[0, :, 0]])
    vals = np.concatenate([vc[0, 0, :2], v_new[0, :, 0], vb[0, :, 0]])
    for i in range(2):
        s = keys @ q[0, i, 0] / math.sqrt(D)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, i, 0], p @ vals / p.sum())


def test_append_overflow_is_refused():
    kc, vc = _caches(1, 1, 4, 1)
    with pytest.raises(ValueError):
        append_context(kc, vc, np.zeros((1, 3, 1, 1)), np.zeros((1, 3, 1, 1)),
                       np.array([2]), np.array([3]))
