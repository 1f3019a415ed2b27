"""block_attention / append_context (Pallas kernels and the plain-jnp version) vs the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_ops import block_attention_xla as bax
from reference import block_attention as ref

TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def make_inputs(seed, *, B, bs, Hq, Hkv, D, S_max, ctx_lens, dtype):
    """Random inputs; every cache row at or past ctx_lens[b] is NaN."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, bs, Hq, D))
    kb = rng.normal(size=(B, bs, Hkv, D))
    vb = rng.normal(size=(B, bs, Hkv, D))
    kc = rng.normal(size=(B, Hkv, S_max, D))
    vc = rng.normal(size=(B, Hkv, S_max, D))
    ctx_lens = np.asarray(ctx_lens, np.int32)
    for b in range(B):
        kc[b, :, ctx_lens[b]:] = np.nan
        vc[b, :, ctx_lens[b]:] = np.nan
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(kb), cast(vb), cast(kc), cast(vc), jnp.asarray(ctx_lens)


def check_against_reference(out, args, *, dtype, **kw):
    want = ref.block_attention(*[np.asarray(a).astype(np.float64) if a.dtype != jnp.int32
                                 else np.asarray(a) for a in args], **kw)
    got = np.asarray(out).astype(np.float64)
    assert out.shape == want.shape and out.dtype == args[0].dtype
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL[dtype])


# ------------------------------------------------------------------------------------------------
# Plain-jnp version
# ------------------------------------------------------------------------------------------------

@st.composite
def xla_case(draw):
    B = draw(st.integers(1, 4))
    bs = draw(st.sampled_from([1, 3, 10, 16]))
    Hkv = draw(st.sampled_from([1, 2]))
    G = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([8, 64]))
    S_max = draw(st.sampled_from([1, 17, 64]))
    ctx = draw(st.lists(st.integers(0, S_max), min_size=B, max_size=B))
    window = draw(st.one_of(st.none(), st.integers(1, 40)))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    return dict(B=B, bs=bs, Hq=Hkv * G, Hkv=Hkv, D=D, S_max=S_max, ctx_lens=ctx, dtype=dtype), window


@given(xla_case(), st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_xla_matches_reference(case, seed):
    shape, window = case
    args = make_inputs(seed, **shape)
    out = jax.jit(lambda *a: bax.block_attention(*a, sliding_window=window))(*args)
    check_against_reference(out, args, dtype=shape["dtype"], sliding_window=window)


def test_xla_append_then_attend():
    B, Hkv, D, S_max, n_max = 3, 2, 16, 24, 5
    ctx = np.array([0, 7, 19], np.int32)
    n_new = np.array([5, 0, 5], np.int32)
    args = make_inputs(1, B=B, bs=4, Hq=4, Hkv=Hkv, D=D, S_max=S_max, ctx_lens=ctx,
                       dtype=jnp.float32)
    rng = np.random.default_rng(2)
    k_new = jnp.asarray(rng.normal(size=(B, n_max, Hkv, D)), jnp.float32)
    v_new = jnp.asarray(rng.normal(size=(B, n_max, Hkv, D)), jnp.float32)
    kc, vc = bax.append_context(args[3], args[4], k_new, v_new, jnp.asarray(ctx),
                                jnp.asarray(n_new))
    want_k, want_v = ref.append_context(np.asarray(args[3]), np.asarray(args[4]),
                                        np.asarray(k_new), np.asarray(v_new), ctx, n_new)
    np.testing.assert_array_equal(np.asarray(kc), want_k)   # NaN rows compare equal as NaN
    np.testing.assert_array_equal(np.asarray(vc), want_v)
    new_args = (*args[:3], kc, vc, jnp.asarray(ctx + n_new))
    out = bax.block_attention(*new_args)
    check_against_reference(out, new_args, dtype=jnp.float32)


def test_xla_static_errors():
    args = make_inputs(0, B=1, bs=2, Hq=3, Hkv=2, D=8, S_max=4, ctx_lens=[1], dtype=jnp.float32)
    with pytest.raises(ValueError, match="multiple"):
        bax.block_attention(*args)
    args = make_inputs(0, B=1, bs=2, Hq=2, Hkv=1, D=8, S_max=4, ctx_lens=[1], dtype=jnp.float32)
    with pytest.raises(ValueError, match="ctx_lens"):
        bax.block_attention(*args[:5], np.array([5], np.int32))   # host value past S_max
    with pytest.raises(ValueError, match="ctx_lens"):
        bax.block_attention(*args[:5], jnp.array([9], jnp.int32), validate=True)
    with pytest.raises(ValueError, match="k_cache"):
        bax.block_attention(*args[:3], args[3][:, :, :, :4], args[4], args[5])
    with pytest.raises(ValueError, match="S_max"):
        bax.append_context(args[3], args[4], jnp.zeros((1, 3, 1, 8)), jnp.zeros((1, 3, 1, 8)),
                           np.array([2], np.int32), np.array([3], np.int32))
