"""block_attention / append_context over quantized (int8 / float8_e4m3fn / float8_e5m2) context
caches with per (KV head, token) scales: the Pallas kernels and the plain-jnp twin.

- Against the float64 reference on the DEQUANTIZED cache (`reference.quant.dequantize`): the
  kernels' only extra error is rounding, so the tolerances are the bf16/f32 ones of
  tests/test_block.py. Cache rows and scales at or past ctx_len are NaN (random fp8 NaN bytes and
  NaN payloads in the scales; int8 has no NaN: -128, a byte `quantize` never writes).
- The quantization error itself, against bounds derived from the formats (not tuned): per
  element for `reference.quant` (random rows, outliers, zero rows, saturation through rounded
  scales), and the perturbation of the attention output it implies (float64, rigorous), with the
  kernel's error against the UNQUANTIZED reference printed per dtype.
- append_context: written values and scales equal `reference.quant.quantize` bit for bit, every
  other byte (NaN-poisoned) unchanged; then attend.
- Race checks in both DMA modes, bad-input ValueErrors, TPU AOT compiles (v5e, v5p, v6e).
"""
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_ops import quant
from pallas_ops.block import BlockAttentionBlockSizes, append_context, block_attention
from pallas_ops.block import check_block_attention_inputs
from pallas_ops.block import xla as bax
from pallas_ops.execution import race_check_params, races_found
from reference import block as ref
from reference import quant as rquant
from tests.test_block import draw_append_lengths
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

CACHE_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
SCALE_DTYPES = ("float32", "bfloat16")
TOL = {"float32": dict(rtol=1e-5, atol=1e-5), "bfloat16": dict(rtol=2e-2, atol=2e-2)}
NP = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
SMALL = BlockAttentionBlockSizes(ctx_tile=128, kv_heads_per_step=2)
THOROUGH = os.environ.get("PALLAS_DFLASH_PROFILE", "ci") == "thorough"


def examples(ci: int) -> int:
    """Hypothesis examples: `ci` under the ci profile (interpreted kernels are slow), the
    thorough profile's own count under PALLAS_DFLASH_PROFILE=thorough."""
    return settings.default.max_examples if THOROUGH else ci


# NaN encodings (all of them for fp8, quiet NaNs with random payloads for the scales): what the
# tests store at or past ctx_len, so a stray read shows, and so does a rewritten byte.
NAN_BYTES = {"float8_e4m3fn": [0x7F, 0xFF], "float8_e5m2": [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]}


def poison_values(rng, shape, cache_dtype):
    """int8: -128 (a byte quantize never writes); fp8: random NaN bytes."""
    if cache_dtype == "int8":
        return np.full(shape, -128, np.int8)
    return rng.choice(NAN_BYTES[cache_dtype], shape).astype(np.uint8).view(
        rquant._NP[cache_dtype])


def poison_scales(rng, shape, scale_dtype):
    """Quiet NaNs with random signs and payloads."""
    if scale_dtype == "float32":
        bits = 0x7FC00000 | rng.integers(0, 1 << 22, shape) | (rng.integers(0, 2, shape) << 31)
        return bits.astype(np.uint32).view(np.float32)
    bits = 0x7FC0 | rng.integers(0, 1 << 6, shape) | (rng.integers(0, 2, shape) << 15)
    return bits.astype(np.uint16).view(ml_dtypes.bfloat16)


def context(rng, shape):
    """Random context rows [..., D]: N(0, 1) times a per-row magnitude in [1/2, 1.4] (scales
    differ from row to row; the scores stay O(1), as with the N(0, 1) data of test_block.py, so
    its bf16/f32 tolerances apply)."""
    return rng.normal(size=shape) * 2.0 ** rng.uniform(-1, 0.5, size=shape[:-1] + (1,))


def quantized_cache(rng, B, Hkv, S_max, D, ctx_lens, cache_dtype, scale_dtype):
    """(x, values, scales): the real context x [B, Hkv, S_max, D] (float64; a few all-zero rows),
    its quantization (reference.quant), rows and scales at or past ctx_lens[b] poisoned."""
    x = context(rng, (B, Hkv, S_max, D))
    x[rng.random((B, Hkv, S_max)) < 0.03] = 0.0      # scale 0, values 0
    values, scales = rquant.quantize(x, cache_dtype, scale_dtype=scale_dtype)
    prng = np.random.default_rng(rng.integers(1 << 32))   # the same x for every dtype
    for b in range(B):
        values[b, :, ctx_lens[b]:] = poison_values(prng, values[b, :, ctx_lens[b]:].shape,
                                                   cache_dtype)
        scales[b, :, ctx_lens[b]:] = poison_scales(prng, scales[b, :, ctx_lens[b]:].shape,
                                                   scale_dtype)
    return x, values, scales


def make_inputs(seed, *, B, bs, Hq, Hkv, D, S_max, ctx_lens, dtype, cache_dtype, scale_dtype):
    """(args, x): args = (q, k_block, v_block, k_cache, v_cache, ctx_lens, k_scales, v_scales) as
    device arrays; x = (k, v) the unquantized float64 context."""
    rng = np.random.default_rng(seed)
    ctx_lens = np.asarray(ctx_lens, np.int32)
    q, kb, vb = (rng.normal(size=(B, bs, h, D)) for h in (Hq, Hkv, Hkv))
    xk, kc, ks = quantized_cache(rng, B, Hkv, S_max, D, ctx_lens, cache_dtype, scale_dtype)
    xv, vc, vs = quantized_cache(rng, B, Hkv, S_max, D, ctx_lens, cache_dtype, scale_dtype)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    args = (cast(q), cast(kb), cast(vb), jnp.asarray(kc), jnp.asarray(vc), jnp.asarray(ctx_lens),
            jnp.asarray(ks), jnp.asarray(vs))
    return args, (xk, xv)


def run(fn, args, **kw):
    return fn(*args[:6], k_scales=args[6], v_scales=args[7], **kw)


def f64(a):
    a = np.asarray(a)
    return a if a.dtype == np.int32 else a.astype(np.float64)


def reference_dequantized(args, **kw):
    """The float64 reference on the dequantized cache (rows past ctx_len are never read)."""
    q, kb, vb, kc, vc, cl, ks, vs = (np.asarray(a) for a in args)
    return ref.block_attention(f64(q), f64(kb), f64(vb), kc, vc, cl, k_scales=ks, v_scales=vs, **kw)


def check(out, args, **kw):
    want = reference_dequantized(args, **kw)
    got = np.asarray(out).astype(np.float64)
    assert out.shape == want.shape and out.dtype == args[0].dtype
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL[jnp.dtype(args[0].dtype).name])


# ------------------------------------------------------------------------------------------------
# The kernel and the xla twin against the reference on the dequantized cache
# ------------------------------------------------------------------------------------------------

@st.composite
def kernel_case(draw):
    B = draw(st.integers(1, 4))
    bs = draw(st.one_of(st.sampled_from([1, 10, 16]), st.integers(1, 24)))
    Hkv = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([64, 128]))
    # Multiples of 32 (8-bit HBM tiles) around the 128-row tile; 32, 160 and 288 end in a partial
    # 128-token scale granule (the zero-padded tail copy).
    S_max = draw(st.sampled_from([32, 128, 160, 256, 288]))
    edges = sorted({0, 1, 31, 32, 127, 128, 129, 255, 256, S_max - 1, S_max}
                   & set(range(S_max + 1)))
    ctx = draw(st.lists(st.one_of(st.sampled_from(edges), st.integers(0, S_max)),
                        min_size=B, max_size=B))
    window = draw(st.one_of(st.none(), st.none(), st.integers(1, 300)))
    shape = dict(B=B, bs=bs, Hq=Hkv * G, Hkv=Hkv, D=D, S_max=S_max, ctx_lens=ctx,
                 dtype=draw(st.sampled_from(["bfloat16", "float32"])),
                 cache_dtype=draw(st.sampled_from(CACHE_DTYPES)),
                 scale_dtype=draw(st.sampled_from(SCALE_DTYPES)))
    bsz = BlockAttentionBlockSizes(ctx_tile=draw(st.sampled_from([128, 256])),
                                   kv_heads_per_step=draw(st.sampled_from([1, 2, 8])))
    return shape, window, bsz


@given(kernel_case(), st.integers(0, 2**31 - 1))
@settings(max_examples=examples(8))
def test_kernel_matches_dequantized_reference(case, seed):
    shape, window, block_sizes = case
    args, _ = make_inputs(seed, **shape)
    out = run(block_attention, args, sliding_window=window, block_sizes=block_sizes)
    check(out, args, sliding_window=window)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_kernel_each_cache_dtype(cache_dtype):
    """Every 8-bit format through both tile paths (unmasked interior tiles, the straddling tile,
    a window's edge tile) and the tail granule (S_max % 128 == 32), both scale dtypes."""
    for scale_dtype, dtype, window in (("float32", "float32", None),
                                       ("bfloat16", "bfloat16", 150)):
        args, _ = make_inputs(3, B=2, bs=10, Hq=8, Hkv=2, D=64, S_max=288, ctx_lens=[288, 200],
                              dtype=dtype, cache_dtype=cache_dtype, scale_dtype=scale_dtype)
        check(run(block_attention, args, sliding_window=window, block_sizes=SMALL), args,
              sliding_window=window)


@st.composite
def xla_case(draw):
    B = draw(st.integers(1, 3))
    Hkv = draw(st.sampled_from([1, 2]))
    S_max = draw(st.sampled_from([1, 17, 64]))
    shape = dict(B=B, bs=draw(st.sampled_from([1, 3, 16])), Hkv=Hkv,
                 Hq=Hkv * draw(st.sampled_from([1, 2, 4])), D=draw(st.sampled_from([8, 64])),
                 S_max=S_max,
                 ctx_lens=draw(st.lists(st.integers(0, S_max), min_size=B, max_size=B)),
                 dtype=draw(st.sampled_from(["bfloat16", "float32"])),
                 cache_dtype=draw(st.sampled_from(CACHE_DTYPES)),
                 scale_dtype=draw(st.sampled_from(SCALE_DTYPES)))
    return shape, draw(st.one_of(st.none(), st.integers(1, 40)))


@given(xla_case(), st.integers(0, 2**31 - 1))
@settings(max_examples=examples(8))
def test_xla_matches_dequantized_reference(case, seed):
    shape, window = case
    args, _ = make_inputs(seed, **shape)
    out = jax.jit(lambda *a: run(bax.block_attention, a, sliding_window=window))(*args)
    check(out, args, sliding_window=window)


def test_heads_per_step_pairs_for_bf16_scales():
    # bf16 scales pack two heads per 32-bit word: a step's heads must start at an even head.
    pick = lambda hps, hkv: BlockAttentionBlockSizes(  # noqa: E731
        kv_heads_per_step=hps).heads_per_step(hkv, pairs=True)
    assert [pick(1, 8), pick(3, 6), pick(1, 3), pick(1, 1), pick(4, 8), pick(8, 2)] == \
        [2, 6, 3, 1, 4, 2]
    assert BlockAttentionBlockSizes(kv_heads_per_step=1).heads_per_step(8) == 1


# ------------------------------------------------------------------------------------------------
# Quantization error against bounds derived from the formats
# ------------------------------------------------------------------------------------------------

FP8 = {"float8_e4m3fn": (3, -6), "float8_e5m2": (2, -14)}   # (mantissa bits, min normal exp)
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8}


def quantization_bound(x, cache_dtype, scale_dtype):
    """Per-element bound on |x - dequantize(quantize(x))|, from the formats alone.

    With a = absmax of the row, u = 2^-24 (f32) and u_s the scale dtype's unit roundoff, the
    stored scale is s = fl_s(a * fl(1/qmax)) in [a/qmax * (1-u)^2 (1-u_s), a/qmax * c] with
    c = (1+u)^2 (1+u_s). y = fl(x/s) (relative error u) then rounds to the format:
    - int8: to the nearest integer, |x - round(y) s| <= s/2 (+ u|x|);
    - fp8 with m mantissa bits and minimum normal exponent e_min: half an ulp, at most
      2^-(m+1) |y| for normal y and 2^(e_min-m-1) for subnormal y (times s, + u|x|);
    - saturation: y beyond qmax only when s is rounded below a/qmax: |x| - qmax s <=
      a (1 - (1-u)^2 (1-u_s)) <= a (2u + u_s).
    """
    qmax = rquant.QMAX[cache_dtype]
    u, us = 2.0**-24, UNIT_ROUNDOFF[scale_dtype]
    a = np.max(np.abs(x), axis=-1, keepdims=True)
    s_hi = a / qmax * (1 + u) ** 2 * (1 + us)
    if cache_dtype == "int8":
        step = 0.5 * s_hi
    else:
        m, emin = FP8[cache_dtype]
        step = 2.0 ** -(m + 1) * np.abs(x) * (1 + u) + 2.0 ** (emin - m - 1) * s_hi
    return step + a * (2 * u + us) + 2 * u * np.abs(x)


def hard_rows(rng, n, D):
    """Rows that stress the formats: wide magnitudes, one outlier each (the rest tiny: fp8
    subnormals / int8 zeros), all-zero rows, constant rows (every element at absmax: saturation
    whenever the scale is rounded down)."""
    x = rng.normal(size=(n, D)) * 10.0 ** rng.uniform(-6, 6, size=(n, 1))
    k = n // 4
    x[:k] *= 1e-4
    x[np.arange(k), rng.integers(0, D, k)] = rng.choice([-1, 1], k) * 10.0 ** rng.uniform(-3, 3, k)
    x[k:k + 3] = 0.0
    x[k + 3:2 * k] = rng.choice([-1, 1], (k - 3, 1)) * 10.0 ** rng.uniform(-6, 6, (k - 3, 1))
    return x


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_quantization_error_within_the_format_bound(cache_dtype, scale_dtype):
    rng = np.random.default_rng(2 * CACHE_DTYPES.index(cache_dtype)
                                + SCALE_DTYPES.index(scale_dtype))
    x = hard_rows(rng, 2048, 128).astype(np.float32).astype(np.float64)   # exact in f32
    values, scales = rquant.quantize(x, cache_dtype, scale_dtype=scale_dtype)
    err = np.abs(rquant.dequantize(values, scales) - x)
    bound = quantization_bound(x, cache_dtype, scale_dtype)
    assert (err <= bound).all(), float(np.max(err - bound))
    # Saturation: a scale rounded below absmax / qmax puts x / scale past qmax, clipped. bf16
    # scales round by up to 2^-9, so it happens (and stayed within the bound above); with f32
    # scales the excess (~2^-24) rounds away in x / scale.
    qmax = rquant.QMAX[cache_dtype]
    s32 = scales.astype(np.float32)[:, None]
    y = np.abs(x.astype(np.float32) / np.where(s32 > 0, s32, np.float32(1)))
    saturated = int(np.sum(y > qmax))
    assert saturated > 0 or scale_dtype == "float32"
    # pallas_ops.quant is the same function, bit for bit, eager and under jit; bf16 inputs put
    # x / scale on .5 ties often (a reciprocal-multiply instead of the division breaks them).
    for xx in (x.astype(np.float32), x.astype(ml_dtypes.bfloat16)):
        want_v, want_s = rquant.quantize(xx.astype(np.float32), cache_dtype,
                                         scale_dtype=scale_dtype)
        fn = lambda a: quant.quantize(a, cache_dtype, scale_dtype=jnp.dtype(scale_dtype))  # noqa
        for v2, s2 in (fn(jnp.asarray(xx)), jax.jit(fn)(jnp.asarray(xx))):
            np.testing.assert_array_equal(np.asarray(v2).view(np.uint8), want_v.view(np.uint8))
            np.testing.assert_array_equal(_bits(s2), _bits(want_s))
    a = np.max(np.abs(x), axis=-1, keepdims=True)
    rel = err / np.where(a > 0, a, 1)
    print(f"\nquantization {cache_dtype}/{scale_dtype}: {saturated} saturated; max "
          f"|err|/absmax {rel.max():.3e} "
          f"(int8 bound 0.5/127 = {0.5 / 127:.3e}); max |err|/|x| over |x| >= absmax/8 "
          f"{np.max(np.where(np.abs(x) >= a / 8, err / np.maximum(np.abs(x), 1e-300), 0)):.3e}")


def attention_perturbation_bound(q, vb, xk, xv, dk, dv, ctx_lens, sm_scale):
    """A float64 bound on |attention(x + d) - attention(x)| per output element, for context
    keys / values x moved by d (the quantization errors, each within `quantization_bound`).

    Context key j's score moves by D_j = sm_scale * q . dk_j, |D_j| <= delta, so every softmax
    weight (block keys included, unmoved) changes by a factor within e^(+-2 delta): the weights
    move by at most e^(2 delta) - 1 in total, times the largest (moved) value; the values
    themselves move by at most max_j |dv_j| (the output is a convex combination)."""
    B, bs, Hq, D = q.shape
    G = Hq // xk.shape[1]
    out = np.zeros(q.shape)
    for b in range(B):
        n = int(ctx_lens[b])
        if n == 0:
            continue
        for h in range(Hq):
            kvh = h // G
            delta = sm_scale * np.max(np.abs(q[b, :, h] @ dk[b, kvh, :n].T), axis=1)     # [bs]
            vmax = np.maximum(np.max(np.abs(xv[b, kvh, :n] + dv[b, kvh, :n]), axis=0),
                              np.max(np.abs(vb[b, :, kvh]), axis=0))                     # [D]
            out[b, :, h] = (np.expm1(2 * delta)[:, None] * vmax[None]
                            + np.max(np.abs(dv[b, kvh, :n]), axis=0)[None])
    return out


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_attention_quantization_error(cache_dtype):
    """The kernel over a quantized cache against the UNQUANTIZED float64 reference: within the
    perturbation bound of the quantization errors (themselves within the format's bound) plus
    the kernel's f32 rounding tolerance. The errors are printed per dtype."""
    shape = dict(B=2, bs=16, Hq=8, Hkv=2, D=128, S_max=384, ctx_lens=[384, 200],
                 dtype="float32", cache_dtype=cache_dtype, scale_dtype="float32")
    args, (xk, xv) = make_inputs(17, **shape)
    q, kb, vb = (f64(a) for a in args[:3])
    ctx = np.asarray(args[5])
    deq_k, deq_v = (rquant.dequantize(np.asarray(args[i]), np.asarray(args[i + 3]))
                    for i in (3, 4))
    for b in range(2):    # rows past ctx_len are NaN: outside the context, no error
        for d, x in ((deq_k, xk), (deq_v, xv)):
            d[b, :, ctx[b]:] = x[b, :, ctx[b]:]
    dk, dv = deq_k - xk, deq_v - xv
    for x, d in ((xk, dk), (xv, dv)):
        assert (np.abs(d) <= quantization_bound(x, cache_dtype, "float32")).all()
    exact = ref.block_attention(q, kb, vb, xk, xv, ctx)
    bound = attention_perturbation_bound(q, vb, xk, xv, dk, dv, ctx, 1 / math.sqrt(128))
    out = run(block_attention, args, block_sizes=SMALL)
    check(out, args)
    err = np.abs(np.asarray(out, np.float64) - exact)
    tol = TOL["float32"]
    assert (err <= bound + tol["atol"] + tol["rtol"] * np.abs(exact)).all()
    # For scale: the same context rounded to bf16 (float64 reference, no kernel).
    bf16 = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64)  # noqa: E731
    err_bf16 = np.abs(ref.block_attention(q, kb, vb, bf16(xk), bf16(xv), ctx) - exact)
    print(f"\nattention {cache_dtype} (f32 scales, f32 q, bs 16, ctx 384/200, D 128, GQA 4): "
          f"kernel vs unquantized reference max abs {err.max():.3e}, mean abs {err.mean():.3e} "
          f"(output rms {np.sqrt(np.mean(exact ** 2)):.3f}); bound max {bound.max():.3e}, "
          f"mean {bound.mean():.3e}; a bf16 context: max abs {err_bf16.max():.3e}, mean abs "
          f"{err_bf16.mean():.3e}")


# ------------------------------------------------------------------------------------------------
# append_context
# ------------------------------------------------------------------------------------------------

def _bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def append_inputs(seed, *, B, Hkv, D, S_max, n_max, ctx, n_new, cache_dtype, scale_dtype,
                  new_dtype):
    """A quantized cache whose every value and scale is poisoned (NaN bytes / -128, NaN scales)
    except random valid rows below ctx, and bf16/f32 new rows."""
    rng = np.random.default_rng(seed)
    ctx = np.asarray(ctx, np.int32)
    caches = [quantized_cache(rng, B, Hkv, S_max, D, ctx, cache_dtype, scale_dtype)[1:]
              for _ in range(2)]
    new = [jnp.asarray(context(rng, (B, n_max, Hkv, D)), new_dtype) for _ in range(2)]
    (kc, ks), (vc, vs) = caches
    return (kc, vc, ks, vs), new, ctx, np.asarray(n_new, np.int32)


def check_append(fn, cache, new, ctx, n_new, **kw):
    kc, vc, ks, vs = cache
    got = fn(jnp.asarray(kc), jnp.asarray(vc), *new, jnp.asarray(ctx), jnp.asarray(n_new),
             k_scales=jnp.asarray(ks), v_scales=jnp.asarray(vs), **kw)
    want = ref.append_context(kc, vc, np.asarray(new[0], np.float32),
                              np.asarray(new[1], np.float32), ctx, n_new, k_scales=ks,
                              v_scales=vs)
    assert len(got) == 4
    for g, w in zip(got, want):   # written rows exact, every other byte (NaN too) untouched
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(_bits(g), _bits(w))
    return got


@pytest.mark.parametrize("cache_dtype,scale_dtype,new_dtype", [
    ("int8", "float32", "float32"),
    ("float8_e4m3fn", "bfloat16", "bfloat16"),
    ("float8_e5m2", "float32", "bfloat16"),
])
def test_append_then_attend(cache_dtype, scale_dtype, new_dtype):
    # Sequence 2 ends at S_max with n_new < n_max (the scale window is clamped to the cache).
    cache, new, ctx, n_new = append_inputs(
        5, B=3, Hkv=2, D=64, S_max=288, n_max=21, ctx=(0, 7, 275), n_new=(21, 0, 13),
        cache_dtype=cache_dtype, scale_dtype=scale_dtype, new_dtype=new_dtype)
    kc, vc, ks, vs = check_append(append_context, cache, new, ctx, n_new)
    check_append(bax.append_context, cache, new, ctx, n_new)
    rng = np.random.default_rng(6)
    q, kb, vb = (jnp.asarray(rng.normal(size=(3, 4, h, 64)), new_dtype) for h in (4, 2, 2))
    args = (q, kb, vb, kc, vc, jnp.asarray(ctx + n_new), ks, vs)
    check(run(block_attention, args, block_sizes=SMALL), args)


@given(st.data())
@settings(max_examples=examples(4))
def test_append_property(data):
    B = data.draw(st.integers(1, 3))
    S_max = data.draw(st.sampled_from([32, 64, 160]))
    n_max, ctx, n_new = draw_append_lengths(data, B, S_max)
    cache, new, ctx, n_new = append_inputs(
        data.draw(st.integers(0, 1000)), B=B, Hkv=data.draw(st.sampled_from([1, 2])), D=64,
        S_max=S_max, n_max=n_max, ctx=ctx, n_new=n_new,
        cache_dtype=data.draw(st.sampled_from(CACHE_DTYPES)),
        scale_dtype=data.draw(st.sampled_from(SCALE_DTYPES)),
        new_dtype=data.draw(st.sampled_from(["bfloat16", "float32"])))
    check_append(append_context, cache, new, ctx, n_new)
    check_append(bax.append_context, cache, new, ctx, n_new)


# ------------------------------------------------------------------------------------------------
# Races
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,cache_dtype,scale_dtype,window", [
    ("on_wait", "int8", "float32", None),
    ("eager", "float8_e4m3fn", "bfloat16", 150),
])
def test_no_races(mode, cache_dtype, scale_dtype, window):
    # S_max 288: the tail granule; ctx 129: a straddling tile of two chunks.
    args, _ = make_inputs(7, B=2, bs=10, Hq=4, Hkv=2, D=64, S_max=288, ctx_lens=[288, 129],
                          dtype="bfloat16", cache_dtype=cache_dtype, scale_dtype=scale_dtype)
    out = run(block_attention, args, sliding_window=window, block_sizes=SMALL,
              interpret=race_check_params(mode))
    jax.block_until_ready(out)
    assert not races_found()
    check(out, args, sliding_window=window)


@pytest.mark.parametrize("mode", ["on_wait", "eager"])
def test_append_no_races(mode):
    cache, new, ctx, n_new = append_inputs(
        9, B=3, Hkv=2, D=64, S_max=96, n_max=21, ctx=(0, 7, 75), n_new=(21, 0, 21),
        cache_dtype="float8_e4m3fn", scale_dtype="float32", new_dtype="float32")
    out = check_append(append_context, cache, new, ctx, n_new, interpret=race_check_params(mode))
    jax.block_until_ready(out)
    assert not races_found()


# ------------------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument, before any kernel
# ------------------------------------------------------------------------------------------------

def test_static_errors():
    ok = dict(B=1, bs=2, Hq=4, Hkv=2, D=64, S_max=64, ctx_lens=[3], dtype="float32",
              cache_dtype="int8", scale_dtype="float32")
    (q, kb, vb, kc, vc, cl, ks, vs), _ = make_inputs(0, **ok)
    fp = jnp.zeros(kc.shape, jnp.float32)
    for fn in (block_attention, bax.block_attention):
        with pytest.raises(ValueError, match="k_scales is required"):
            fn(q, kb, vb, kc, vc, cl, v_scales=vs)
        with pytest.raises(ValueError, match="v_scales is required"):
            fn(q, kb, vb, kc, vc, cl, k_scales=ks)
        with pytest.raises(ValueError, match="k_scales given for a float32 cache"):
            fn(q, kb, vb, fp, fp, cl, k_scales=ks, v_scales=vs)
        with pytest.raises(ValueError, match="v_scales given"):
            fn(q, kb, vb, fp, fp, cl, v_scales=vs)
        with pytest.raises(ValueError, match="k_scales shape"):
            fn(q, kb, vb, kc, vc, cl, k_scales=ks[:, :, :32], v_scales=vs)
        with pytest.raises(ValueError, match="v_scales must be a rank-3 array"):
            fn(q, kb, vb, kc, vc, cl, k_scales=ks, v_scales=vs[..., None])
        for bad in (jnp.float16, jnp.int8, jnp.int32):
            with pytest.raises(ValueError, match="k_scales dtype"):
                fn(q, kb, vb, kc, vc, cl, k_scales=ks.astype(bad), v_scales=vs.astype(bad))
        with pytest.raises(ValueError, match="v_scales dtype .* must equal k_scales dtype"):
            fn(q, kb, vb, kc, vc, cl, k_scales=ks, v_scales=vs.astype(jnp.bfloat16))
        for bad in (jnp.float16, jnp.int4, jnp.uint8):
            with pytest.raises(ValueError, match="k_cache dtype .* not supported"):
                fn(q, kb, vb, kc.astype(bad), vc.astype(bad), cl, k_scales=ks, v_scales=vs)
        with pytest.raises(ValueError, match="v_cache dtype"):
            fn(q, kb, vb, kc, vc.astype(jnp.float8_e4m3fn), cl, k_scales=ks, v_scales=vs)
        with pytest.raises(ValueError, match="k_cache dtype bfloat16 must equal q dtype"):
            fn(q, kb, vb, fp.astype(jnp.bfloat16), fp.astype(jnp.bfloat16), cl)
    # 8-bit caches: S_max a multiple of 32 for the Pallas kernels ((32, 128) HBM tiles) only.
    args40, _ = make_inputs(0, **{**ok, "S_max": 40})
    with pytest.raises(ValueError, match="S_max=40 must be a multiple of 32"):
        run(block_attention, args40)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_block_attention_inputs(*args40[:6], k_scales=args40[6], v_scales=args40[7])
    check(run(bax.block_attention, args40), args40)
    check_block_attention_inputs(q, kb, vb, kc, vc, cl, k_scales=ks, v_scales=vs)   # valid
    with pytest.raises(ValueError, match="k_scales is required"):
        check_block_attention_inputs(q, kb, vb, kc, vc, cl)


def test_append_static_errors():
    (kc, vc, ks, vs), (kn, vn), ctx, n_new = append_inputs(
        0, B=1, Hkv=2, D=64, S_max=64, n_max=3, ctx=(0,), n_new=(3,), cache_dtype="int8",
        scale_dtype="float32", new_dtype="float32")
    kc, vc, ks, vs, cl, nn = (jnp.asarray(a) for a in (kc, vc, ks, vs, ctx, n_new))
    for fn in (append_context, bax.append_context):
        with pytest.raises(ValueError, match="k_scales is required"):
            fn(kc, vc, kn, vn, cl, nn, v_scales=vs)
        with pytest.raises(ValueError, match="k_scales given for a float32 cache"):
            fn(kc.astype(jnp.float32), vc.astype(jnp.float32), kn, vn, cl, nn, k_scales=ks,
               v_scales=vs)
        with pytest.raises(ValueError, match="v_scales shape"):
            fn(kc, vc, kn, vn, cl, nn, k_scales=ks, v_scales=vs[:, :1])
        with pytest.raises(ValueError, match="k_scales dtype"):
            fn(kc, vc, kn, vn, cl, nn, k_scales=ks.astype(jnp.float16),
               v_scales=vs.astype(jnp.float16))
        with pytest.raises(ValueError, match="v_scales dtype .* must equal k_scales dtype"):
            fn(kc, vc, kn, vn, cl, nn, k_scales=ks.astype(jnp.bfloat16), v_scales=vs)
        with pytest.raises(ValueError, match="k_new dtype int8 not supported"):
            fn(kc, vc, kn.astype(jnp.int8), vn, cl, nn, k_scales=ks, v_scales=vs)
        with pytest.raises(ValueError, match="v_new dtype"):
            fn(kc, vc, kn, vn.astype(jnp.bfloat16), cl, nn, k_scales=ks, v_scales=vs)
        with pytest.raises(ValueError, match="k_cache dtype uint8 not supported"):
            fn(kc.astype(jnp.uint8), vc.astype(jnp.uint8), kn, vn, cl, nn, k_scales=ks,
               v_scales=vs)
        with pytest.raises(ValueError, match="v_cache dtype"):
            fn(kc, vc.astype(jnp.float8_e5m2), kn, vn, cl, nn, k_scales=ks, v_scales=vs)
    with pytest.raises(ValueError, match="S_max=40 must be a multiple of 32"):
        append_context(kc[:, :, :40], vc[:, :, :40], kn, vn, cl, nn, k_scales=ks[:, :, :40],
                       v_scales=vs[:, :, :40])


# ------------------------------------------------------------------------------------------------
# TPU AOT compile (real Mosaic through libtpu)
# ------------------------------------------------------------------------------------------------

def drafter_specs(B, bs, S_max, cache_dtype, scale_dtype, dtype=jnp.bfloat16):
    S = jax.ShapeDtypeStruct
    return (S((B, bs, 32, 128), dtype), S((B, bs, 8, 128), dtype), S((B, bs, 8, 128), dtype),
            S((B, 8, S_max, 128), cache_dtype), S((B, 8, S_max, 128), cache_dtype),
            S((B,), jnp.int32), S((B, 8, S_max), scale_dtype), S((B, 8, S_max), scale_dtype))


AOT_CASES = [(chip, c) for chip in CHIPS_UNDER_TEST for c in ("int8", "float8_e4m3fn")] + \
    [("v5p", "float8_e5m2")]


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip,cache_dtype", AOT_CASES)
def test_compiles_for_tpu(chip, cache_dtype):
    """The Qwen3-8B drafter (bs 16, Hq 32, Hkv 8, D 128) over an 8-bit cache: B 32 at S_max 8192
    with f32 scales and the chip's block sizes; for v5p fp8 (every case in the thorough profile)
    also B 8 with a sliding window, bf16 scales, S_max 8224 (a tail granule: a 32-token scale DMA
    would be refused) and kv_heads_per_step=1 (bf16 scales need head pairs: odd head offsets
    are refused)."""
    cases = [(32, 8192, jnp.float32, None, None)]
    if (chip, cache_dtype) == ("v5p", "float8_e4m3fn") or THOROUGH:
        cases.append((8, 8224, jnp.bfloat16, 2048, BlockAttentionBlockSizes(kv_heads_per_step=1)))
    for B, S_max, scale_dtype, window, bsz in cases:
        compiled = aot_compile(
            lambda *a: run(block_attention, a, sliding_window=window, block_sizes=bsz,
                           interpret=False, chip=chip),
            *drafter_specs(B, 16, S_max, jnp.dtype(cache_dtype), scale_dtype), chip=chip)
        assert "dflash_block_attention" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip,cache_dtype", AOT_CASES)
def test_append_compiles_for_tpu(chip, cache_dtype):
    S = jax.ShapeDtypeStruct
    B, n_max, S_max = 32, 16, 8224
    cache = S((B, 8, S_max, 128), jnp.dtype(cache_dtype))
    scales = S((B, 8, S_max), jnp.float32)
    new = S((B, n_max, 8, 128), jnp.bfloat16)
    lens = S((B,), jnp.int32)
    compiled = aot_compile(
        lambda kc, vc, kn, vn, cl, nn, ks, vs: append_context(
            kc, vc, kn, vn, cl, nn, k_scales=ks, v_scales=vs, interpret=False),
        cache, cache, new, new, lens, lens, scales, scales, chip=chip)
    assert "dflash_append_context" in compiled.as_text()
