"""block_attention / append_context (Pallas kernels and the plain-jnp version) vs the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from pallas_ops.execution import race_check_params, races_found
from pallas_ops.block import xla as bax
from pallas_ops.block import (
    BlockAttentionBlockSizes,
    append_context,
    block_attention,
    check_block_attention_inputs,
)
from reference import block as ref
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

# Small context tiles so a few hundred cache rows cross several tile boundaries.
SMALL = BlockAttentionBlockSizes(ctx_tile=128, kv_heads_per_step=2)

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


def to_f64(x):
    x = np.asarray(x)
    return x if x.dtype == np.int32 else x.astype(np.float64)


def check_against_reference(out, args, *, dtype, **kw):
    want = ref.block_attention(*[to_f64(a) for a in args], **kw)
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
@settings(max_examples=10)
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


# ------------------------------------------------------------------------------------------------
# Pallas kernel (TPU interpreter)
# ------------------------------------------------------------------------------------------------

@st.composite
def kernel_case(draw):
    B = draw(st.integers(1, 8))
    bs = draw(st.one_of(st.sampled_from([1, 10, 16, 32]), st.integers(1, 32)))
    Hkv = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    D = draw(st.sampled_from([64, 128, 256]))
    # Capacities around the 128-row tile: shorter than a tile, exact multiples, ragged ends
    # (S_max % 128 in {8, 40, 72}: a short last DMA chunk).
    S_max = draw(st.sampled_from([8, 128, 200, 256, 296, 384]))
    edges = sorted({0, 1, 127, 128, 129, 255, 256, 257, S_max - 1, S_max} & set(range(S_max + 1)))
    ctx = draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(0, S_max)),
                        min_size=B, max_size=B))
    window = draw(st.one_of(st.none(), st.none(), st.integers(1, 300)))
    dtype = draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    hps = draw(st.sampled_from([1, 2, 8]))
    shape = dict(B=B, bs=bs, Hq=Hkv * G, Hkv=Hkv, D=D, S_max=S_max, ctx_lens=ctx, dtype=dtype)
    return shape, window, BlockAttentionBlockSizes(ctx_tile=128, kv_heads_per_step=hps)


@given(kernel_case(), st.integers(0, 2**31 - 1))
@settings(max_examples=10)
def test_kernel_matches_reference(case, seed):
    shape, window, block_sizes = case
    args = make_inputs(seed, **shape)
    out = block_attention(*args, sliding_window=window, block_sizes=block_sizes)
    check_against_reference(out, args, dtype=shape["dtype"], sliding_window=window)


def test_kernel_sm_scale_and_longer_tiles():
    shape = dict(B=2, bs=10, Hq=8, Hkv=2, D=128, S_max=640, ctx_lens=[513, 640],
                 dtype=jnp.float32)
    args = make_inputs(3, **shape)
    out = block_attention(*args, sm_scale=0.3,
                          block_sizes=BlockAttentionBlockSizes(ctx_tile=256))
    check_against_reference(out, args, dtype=jnp.float32, sm_scale=0.3)


@pytest.mark.parametrize("tile", [640, 768])
def test_tile_not_a_multiple_of_the_masked_subtile(tile):
    # The masked path's sub-tiles must divide the tile: 512-row sub-tiles of a 640-row tile
    # straddling ctx_len read rows 640..1023 of a 640-row buffer.
    shape = dict(B=1, bs=4, Hq=2, Hkv=1, D=64, S_max=768, ctx_lens=[tile - 40],
                 dtype=jnp.float32)
    args = make_inputs(13, **shape)
    out = block_attention(*args, block_sizes=BlockAttentionBlockSizes(ctx_tile=tile,
                                                                      kv_heads_per_step=1))
    check_against_reference(out, args, dtype=jnp.float32)


def test_window_interior_tile_runs_unmasked_and_default_block_sizes():
    # W=200, ctx 384, bs 4, 128-row tiles: tile 0 is left of the window (not read), tile 1
    # reaches the window's edge (masked), tile 2 is fully visible to every row (unmasked path).
    shape = dict(B=1, bs=4, Hq=4, Hkv=1, D=64, S_max=384, ctx_lens=[384], dtype=jnp.float32)
    args = make_inputs(11, **shape)
    out = block_attention(*args, sliding_window=200, block_sizes=SMALL)
    check_against_reference(out, args, dtype=jnp.float32, sliding_window=200)
    # block_sizes=None off TPU: the fallback (1024-row tiles) on a 64-row cache.
    args = make_inputs(12, **{**shape, "S_max": 64, "ctx_lens": [37]})
    check_against_reference(block_attention(*args), args, dtype=jnp.float32)


def test_window_edge_at_a_tile_start():
    # ctx 256, bs 4, W 131: context key j is visible to every block row iff
    # j > ctx + bs - 1 - W = 128, so the tile starting at key 128 holds the one key the last row
    # must not see (128 > 256 + 3 - 131 is false): that tile has to run the masked path.
    shape = dict(B=1, bs=4, Hq=4, Hkv=1, D=64, S_max=256, ctx_lens=[256], dtype=jnp.float32)
    args = make_inputs(5, **shape)
    out = block_attention(*args, sliding_window=131, block_sizes=SMALL)
    check_against_reference(out, args, dtype=jnp.float32, sliding_window=131)


def _append_inputs(seed, dtype, *, B=3, Hkv=2, D=64, S_max=296, n_max=21,
                   ctx=(0, 7, 275), n_new=(21, 0, 21)):
    ctx = np.asarray(ctx, np.int32)
    n_new = np.asarray(n_new, np.int32)
    args = make_inputs(seed, B=B, bs=4, Hq=2 * Hkv, Hkv=Hkv, D=D, S_max=S_max, ctx_lens=ctx,
                       dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    k_new = jnp.asarray(rng.normal(size=(B, n_max, Hkv, D)), dtype)
    v_new = jnp.asarray(rng.normal(size=(B, n_max, Hkv, D)), dtype)
    return args, k_new, v_new, ctx, n_new


def _assert_same_cache(got, want):
    np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want.astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_append_then_attend(dtype):
    args, k_new, v_new, ctx, n_new = _append_inputs(5, dtype)
    kc, vc = append_context(args[3], args[4], k_new, v_new, jnp.asarray(ctx), jnp.asarray(n_new))
    want_k, want_v = ref.append_context(to_f64(args[3]), to_f64(args[4]), to_f64(k_new),
                                        to_f64(v_new), ctx, n_new)
    _assert_same_cache(kc, want_k)   # written rows exact, every other row (NaN too) untouched
    _assert_same_cache(vc, want_v)
    new_args = (*args[:3], kc, vc, jnp.asarray(ctx + n_new))
    out = block_attention(*new_args, block_sizes=SMALL)
    check_against_reference(out, new_args, dtype=dtype)


def draw_append_lengths(data, B, S_max):
    """(n_max, ctx [B], n_new [B]) with ctx + n_new <= S_max: what append_context may be given."""
    n_max = data.draw(st.integers(1, min(S_max, 40)))
    ctx, n_new = [], []
    for _ in range(B):
        n = data.draw(st.integers(0, n_max))
        ctx.append(data.draw(st.integers(0, S_max - n)))
        n_new.append(n)
    return n_max, ctx, n_new


@given(st.data())
@settings(max_examples=6)
def test_append_property(data):
    B = data.draw(st.integers(1, 4))
    S_max = data.draw(st.sampled_from([16, 40, 128, 136]))
    n_max, ctx, n_new = draw_append_lengths(data, B, S_max)
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    args, k_new, v_new, ctx, n_new = _append_inputs(
        data.draw(st.integers(0, 1000)), dtype, B=B, Hkv=data.draw(st.sampled_from([1, 2])),
        S_max=S_max, n_max=n_max, ctx=ctx, n_new=n_new)
    kc, vc = append_context(args[3], args[4], k_new, v_new, jnp.asarray(ctx), jnp.asarray(n_new))
    want_k, want_v = ref.append_context(to_f64(args[3]), to_f64(args[4]), to_f64(k_new),
                                        to_f64(v_new), ctx, n_new)
    _assert_same_cache(kc, want_k)
    _assert_same_cache(vc, want_v)




@pytest.mark.parametrize("mode", ["on_wait", "eager"])
@pytest.mark.parametrize("window", [None, 150])
def test_no_races(mode, window):
    shape = dict(B=2, bs=10, Hq=4, Hkv=2, D=64, S_max=296, ctx_lens=[296, 129],
                 dtype=jnp.bfloat16)
    args = make_inputs(7, **shape)
    out = block_attention(*args, sliding_window=window, block_sizes=SMALL,
                          interpret=race_check_params(mode))
    jax.block_until_ready(out)
    assert not races_found()
    check_against_reference(out, args, dtype=jnp.bfloat16, sliding_window=window)


@pytest.mark.parametrize("mode", ["on_wait", "eager"])
def test_append_no_races(mode):
    args, k_new, v_new, ctx, n_new = _append_inputs(9, jnp.float32)
    kc, vc = append_context(args[3], args[4], k_new, v_new, jnp.asarray(ctx), jnp.asarray(n_new),
                            interpret=race_check_params(mode))
    jax.block_until_ready((kc, vc))
    assert not races_found()
    want_k, _ = ref.append_context(to_f64(args[3]), to_f64(args[4]), to_f64(k_new),
                                   to_f64(v_new), ctx, n_new)
    _assert_same_cache(kc, want_k)


def test_static_errors():
    ok = dict(B=1, bs=2, Hq=4, Hkv=2, D=64, S_max=8, ctx_lens=[3], dtype=jnp.float32)
    q, kb, vb, kc, vc, cl = make_inputs(0, **ok)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        block_attention(*make_inputs(0, **{**ok, "Hq": 3}))
    with pytest.raises(ValueError, match="head dim"):
        block_attention(*make_inputs(0, **{**ok, "D": 32}))
    with pytest.raises(ValueError, match="block size"):
        block_attention(*make_inputs(0, **{**ok, "bs": 65}))
    with pytest.raises(ValueError, match="k_block dtype"):
        block_attention(q, kb.astype(jnp.bfloat16), vb, kc, vc, cl)
    with pytest.raises(ValueError, match="ctx_lens must be int32"):
        block_attention(q, kb, vb, kc, vc, cl.astype(jnp.int16))
    with pytest.raises(ValueError, match="v_cache shape"):
        block_attention(q, kb, vb, kc, vc[:, :, :4], cl)
    with pytest.raises(ValueError, match="sliding_window"):
        block_attention(q, kb, vb, kc, vc, cl, sliding_window=0)
    with pytest.raises(ValueError, match="block_sizes"):
        block_attention(q, kb, vb, kc, vc, cl, block_sizes=(128, 2))
    with pytest.raises(ValueError, match="ctx_tile"):
        BlockAttentionBlockSizes(ctx_tile=100)
    with pytest.raises(ValueError, match="multiple of 8"):
        block_attention(*make_inputs(0, **{**ok, "S_max": 12}))
    with pytest.raises(ValueError, match="multiple of 8"):
        append_context(kc[:, :, :6], vc[:, :, :6], kb, vb, cl, cl)
    with pytest.raises(ValueError, match="VMEM"):
        block_attention(q, kb, vb, kc, vc, cl,
                        block_sizes=BlockAttentionBlockSizes(ctx_tile=1 << 20))
    new = jnp.zeros((1, 2, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="k_new shape"):
        append_context(kc, vc, new[:, :, :1], new, cl, cl)
    with pytest.raises(ValueError, match="n_new must be int32"):
        append_context(kc, vc, new, new, cl, cl.astype(jnp.float32))


def test_dynamic_errors():
    q, kb, vb, kc, vc, cl = make_inputs(0, B=2, bs=2, Hq=4, Hkv=2, D=64, S_max=8,
                                        ctx_lens=[3, 8], dtype=jnp.float32)
    bad = jnp.array([3, 9], jnp.int32)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        block_attention(q, kb, vb, kc, vc, bad, validate=True)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        block_attention(q, kb, vb, kc, vc, np.asarray(bad))        # host lengths: always checked
    with pytest.raises(ValueError, match=">= 0"):
        check_block_attention_inputs(q, kb, vb, kc, vc, jnp.array([-1, 0], jnp.int32))
    check_block_attention_inputs(q, kb, vb, kc, vc, cl)              # valid: no error
    new = jnp.zeros((2, 3, 2, 64), jnp.float32)
    n_new = jnp.array([3, 1], jnp.int32)
    with pytest.raises(ValueError, match="ctx_lens \\+ n_new"):
        append_context(kc, vc, new, new, cl, n_new, validate=True)
    with pytest.raises(ValueError, match="ctx_lens \\+ n_new"):
        check_block_attention_inputs(q, kb, vb, kc, vc, cl, n_new=n_new)
    with pytest.raises(ValueError, match="n_new must be in"):
        append_context(kc, vc, new, new, np.array([0, 0], np.int32), np.array([4, 0], np.int32))
    with pytest.raises(ValueError, match="validate=True needs concrete"):
        jax.jit(lambda c: block_attention(q, kb, vb, kc, vc, c, validate=True))(cl)


# ------------------------------------------------------------------------------------------------
# TPU AOT compile (real Mosaic through libtpu)
# ------------------------------------------------------------------------------------------------

def drafter_specs(B, bs, S_max=8192, dtype=jnp.bfloat16):
    S = jax.ShapeDtypeStruct
    return (S((B, bs, 32, 128), dtype), S((B, bs, 8, 128), dtype), S((B, bs, 8, 128), dtype),
            S((B, 8, S_max, 128), dtype), S((B, 8, S_max, 128), dtype), S((B,), jnp.int32))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("B,bs", [(1, 16), (32, 16), (1, 10)])
def test_compiles_for_tpu(chip, B, bs):
    """Qwen3-8B drafter (bs 16, B 1 and 32) and Llama-3.1 drafter (bs 10) geometry, S_max 8192."""
    compiled = aot_compile(lambda *a: block_attention(*a, interpret=False, chip=chip),
                           *drafter_specs(B, bs), chip=chip)
    assert "dflash_block_attention" in compiled.as_text()


def _thorough_except(chip, keep="v5p"):
    import os

    if chip != keep and os.environ.get("PALLAS_DFLASH_PROFILE", "ci") != "thorough":
        pytest.skip("other generations in the thorough profile only")


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_compiles_for_tpu_window_and_ragged_capacity(chip):
    """A sliding window, f32, and S_max % 128 == 8 (the short last DMA chunk)."""
    _thorough_except(chip)
    compiled = aot_compile(
        lambda *a: block_attention(*a, sliding_window=2048, interpret=False, chip=chip),
        *drafter_specs(8, 10, S_max=8200, dtype=jnp.float32), chip=chip)
    assert "dflash_block_attention" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("B,n_max,S_max", [(32, 16, 8200)])
def test_append_compiles_for_tpu(chip, B, n_max, S_max):
    S = jax.ShapeDtypeStruct
    cache = S((B, 8, S_max, 128), jnp.bfloat16)
    new = S((B, n_max, 8, 128), jnp.bfloat16)
    lens = S((B,), jnp.int32)
    compiled = aot_compile(lambda *a: append_context(*a, interpret=False),
                           cache, cache, new, new, lens, lens, chip=chip)
    assert "dflash_append_context" in compiled.as_text()
