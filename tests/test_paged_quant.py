"""8-bit KV caches (int8, float8_e4m3fn, float8_e5m2 with per-(head, token) scales) and attention
sinks in `paged_attention` / `write_kv_pages`, kernel and jnp twin, against the references.

Cases come from `tests.test_paged.make_case` (float pages with everything the kernel must not read
poisoned: unused pages, rows past kv_len, pages left of a window are NaN, unneeded page-table
slots hold huge indices), then quantized with `reference.quant.quantize`: poisoned rows get NaN
scales (and, in fp8, NaN values), so reading one shows up as NaN in the output. The reference is
float64 attention over the dequantized cache (stored value * scale): the kernel's only extra error
is rounding, so tolerances are those of the q dtype.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_ops import quant
from pallas_ops.execution import race_check_params, races_found
from pallas_ops.paged import PagedAttentionBlockSizes, paged_attention, write_kv_pages
from pallas_ops.paged.xla import paged_attention_xla, write_kv_pages_xla
from reference import paged as ref
from reference import quant as rquant
from tests.test_paged import Geometry, examples, make_case, new_token_slots, ragged_batches
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

B = PagedAttentionBlockSizes
CACHE_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")


@dataclasses.dataclass(frozen=True)
class QuantGeometry:
    geo: Geometry            # shapes and options; geo.kv_dtype is the dtype values are drawn in
    cache_dtype: str         # int8 | float8_e4m3fn | float8_e5m2
    scale_dtype: str         # float32 | bfloat16
    sinks: bool = False

    @property
    def name(self):
        return f"{self.geo.name}-{self.cache_dtype}-{self.scale_dtype}" + ("-sinks" * self.sinks)


QGEOS = [
    # decode / verify mixes, GQA 4, pages of 16 (8 pages per 128-key scale granule), f32 q
    QuantGeometry(Geometry("g4-f32q-d128-p16", 2, 4, 128, 16, "float32", "float32", 32, 4, 10,
                           B(kv_tokens=128, q_tokens=8)), "int8", "float32"),
    # bf16 q, pages of 32 over two KV blocks, bf16 scales, sinks
    QuantGeometry(Geometry("g2-bf16q-d128-p32", 1, 2, 128, 32, "float32", "bfloat16", 24, 3, 8,
                           B(kv_tokens=128, q_tokens=8)), "float8_e4m3fn", "bfloat16", sinks=True),
    # sliding window (first page rounded down to the scale granule), pages of 64, G = 8
    QuantGeometry(Geometry("g8-f32q-d64-p64-window", 1, 8, 64, 64, "float32", "float32", 16, 4,
                           4, B(kv_tokens=128, q_tokens=2), sliding_window=100),
                  "float8_e5m2", "float32"),
    # prefill chunks, default block sizes, soft cap, pages of 16, f32 q
    QuantGeometry(Geometry("g2-f32q-d128-p16-prefill-softcap", 2, 2, 128, 16, "float32",
                           "float32", 80, 4, 6, None, soft_cap=20.0), "int8", "bfloat16",
                  sinks=True),
]


@dataclasses.dataclass
class QCase:
    qgeo: QuantGeometry
    case: object             # tests.test_paged.Case (float pages)
    k_pages: np.ndarray      # 8-bit
    v_pages: np.ndarray
    k_scales: np.ndarray
    v_scales: np.ndarray
    sinks: np.ndarray | None

    def args(self):
        c = self.case
        return (c.q, self.k_pages, self.v_pages, c.kv_lens, c.page_indices, c.cu_q_lens,
                c.num_seqs)

    def kwargs(self):
        kw = dict(self.case.geo.options(), k_scales=self.k_scales, v_scales=self.v_scales)
        if self.sinks is not None:
            kw["sinks"] = self.sinks
        return kw


def quantize_case(qgeo: QuantGeometry, case, seed=0) -> QCase:
    kq, ks = rquant.quantize(case.k_pages, qgeo.cache_dtype, scale_dtype=qgeo.scale_dtype)
    vq, vs = rquant.quantize(case.v_pages, qgeo.cache_dtype, scale_dtype=qgeo.scale_dtype)
    sinks = None
    if qgeo.sinks:
        hq = case.geo.num_kv_heads * case.geo.group
        sinks = np.random.default_rng(seed).normal(0.0, 2.0, size=hq).astype(np.float32)
    return QCase(qgeo, case, kq, vq, ks, vs, sinks)


def reference(qc: QCase):
    return ref.paged_attention(*qc.args(), **qc.kwargs())


def tolerance(qc: QCase):
    if qc.case.geo.q_dtype == "bfloat16":
        return dict(rtol=3e-2, atol=3e-2)
    return dict(rtol=2e-5, atol=2e-5)


def assert_matches(qc: QCase, out):
    out = np.asarray(out, np.float64)
    want = reference(qc)
    assert not np.isnan(out).any(), "NaN in the output: a poisoned page, row or scale was read"
    np.testing.assert_allclose(out, want, **tolerance(qc))
    n_rows = qc.case.cu_q_lens[qc.case.num_seqs[0]]
    assert np.all(out[n_rows:] == 0.0)


@st.composite
def qcases(draw, qgeo: QuantGeometry):
    case = draw(ragged_batches(qgeo.geo))
    return quantize_case(qgeo, case, seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("qgeo", QGEOS, ids=lambda g: g.name)
@settings(max_examples=examples(3))
@given(data=st.data())
def test_kernel_matches_reference_over_dequantized_cache(qgeo, data):
    qc = data.draw(qcases(qgeo))
    assert_matches(qc, paged_attention(*qc.args(), **qc.kwargs(),
                                       block_sizes=qgeo.geo.block_sizes))


@functools.lru_cache(maxsize=None)
def _xla(soft_cap, sliding_window):
    return jax.jit(functools.partial(paged_attention_xla, soft_cap=soft_cap,
                                     sliding_window=sliding_window))


@pytest.mark.parametrize("qgeo", QGEOS, ids=lambda g: g.name)
@settings(max_examples=examples(8))
@given(data=st.data())
def test_xla_matches_reference_over_dequantized_cache(qgeo, data):
    qc = data.draw(qcases(qgeo))
    kw = qc.kwargs()
    fn = _xla(kw.pop("soft_cap"), kw.pop("sliding_window"))
    assert_matches(qc, fn(*qc.args(), **kw))


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_every_cache_dtype_and_sinks_on_a_plain_cache(cache_dtype):
    # One decode row, a verify block and a prefill chunk per 8-bit format; then sinks on a bf16
    # cache (the unquantized path) against the reference.
    qgeo = dataclasses.replace(QGEOS[0], cache_dtype=cache_dtype, sinks=True)
    case = make_case(qgeo.geo, [1, 10, 16], [130, 23, 64], seed=5)
    qc = quantize_case(qgeo, case, seed=1)
    assert_matches(qc, paged_attention(*qc.args(), **qc.kwargs(),
                                       block_sizes=qgeo.geo.block_sizes))
    plain = dataclasses.replace(qgeo.geo, kv_dtype="bfloat16", q_dtype="bfloat16")
    pc = make_case(plain, [1, 10, 16], [130, 23, 64], seed=6)
    sinks = np.random.default_rng(2).normal(0, 2, size=8).astype(np.float32)
    want = ref.paged_attention(*pc.args(), sinks=sinks)
    for out in (paged_attention(*pc.args(), sinks=sinks, block_sizes=plain.block_sizes),
                paged_attention_xla(*pc.args(), sinks=sinks)):
        np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=3e-2, atol=3e-2)


def test_sinks_limits():
    # A sink of -inf is no sink at all; a huge sink takes all the weight (the output -> 0); the
    # weights of the keys are exp(s) / (exp(sink) + sum exp(s)) at any head dim, 64 included.
    geo = Geometry("g2-f32-d64-p16", 2, 2, 64, 16, "float32", "float32", 16, 2, 4,
                   B(kv_tokens=32, q_tokens=8))
    case = make_case(geo, [1, 10], [40, 23], seed=9)
    n = case.cu_q_lens[case.num_seqs[0]]
    plain = np.asarray(paged_attention(*case.args(), block_sizes=geo.block_sizes), np.float64)
    none = np.asarray(paged_attention(*case.args(), sinks=np.full(4, -np.inf, np.float32),
                                      block_sizes=geo.block_sizes), np.float64)
    np.testing.assert_allclose(none, plain, rtol=1e-6, atol=1e-6)
    huge = np.asarray(paged_attention(*case.args(), sinks=np.full(4, 80.0, np.float32),
                                      block_sizes=geo.block_sizes), np.float64)
    assert np.abs(huge[:n]).max() < 1e-20
    sinks = np.array([0.0, 1.0, -1.0, 3.0], np.float32)
    got = np.asarray(paged_attention(*case.args(), sinks=sinks, block_sizes=geo.block_sizes))
    np.testing.assert_allclose(got, ref.paged_attention(*case.args(), sinks=sinks),
                               rtol=2e-5, atol=2e-5)


# ------------------------------------------------------------------------------------------------
# Quantization error: against the unquantized values, bounded by the format
# ------------------------------------------------------------------------------------------------

# (relative half-ulp of a normal number, smallest subnormal step / 2) per format
_FORMAT = {"float8_e4m3fn": (2.0 ** -4, 2.0 ** -10), "float8_e5m2": (2.0 ** -3, 2.0 ** -17)}


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_quantization_error_is_bounded_by_the_format(cache_dtype, scale_dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4, 128)).astype(np.float32) * rng.uniform(1e-3, 1e3, (64, 4, 1))
    x[0, 0] = 0.0                                   # an all-zero row: scale 0, values 0
    x[1, 0, :3] = [1e30, -1e30, 1.0]                # absmax far from the rest
    vals, scales = rquant.quantize(x, cache_dtype, scale_dtype=scale_dtype)
    deq = rquant.dequantize(vals, scales)
    assert np.all(deq[0, 0] == 0.0) and np.all(scales[0, 0] == 0)
    s = scales.astype(np.float64)[..., None]
    err = np.abs(deq - x.astype(np.float64))
    if cache_dtype == "int8":
        bound = 0.5 * s                              # half a quantization step
    else:
        rel, sub = _FORMAT[cache_dtype]
        bound = rel * np.abs(x) + sub * s
    # + the rounding of the scale to its dtype can push the largest value past qmax (saturated):
    # at most one step of the scale's own precision.
    eps = 2.0 ** -8 if scale_dtype == "bfloat16" else 2.0 ** -23
    bound = bound + eps * np.abs(x)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-30)
    # bit for bit what the jnp quantizer (used by the kernels' write paths) produces
    jv, js = quant.quantize(jnp.asarray(x), jnp.dtype(cache_dtype),
                            scale_dtype=jnp.dtype(scale_dtype))
    np.testing.assert_array_equal(np.asarray(jv).view(np.uint8), vals.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(js).astype(np.float32), scales.astype(np.float32))


# ------------------------------------------------------------------------------------------------
# write_kv_pages into 8-bit pages
# ------------------------------------------------------------------------------------------------

def _u8(x):
    x = np.asarray(x)
    return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(
        np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def _split_new_tokens(qc: QCase):
    """The new tokens' float K/V [T, Hkv, D] (from the float case), and the 8-bit cache with
    their slots poisoned (NaN scales, arbitrary values)."""
    c, geo = qc.case, qc.case.geo
    t, hkv, d = geo.num_tokens, geo.num_kv_heads, geo.head_dim
    k_new = np.full((t, hkv, d), np.nan, np.float32)
    v_new = np.full((t, hkv, d), np.nan, np.float32)
    before = [a.copy() for a in (qc.k_pages, qc.v_pages, qc.k_scales, qc.v_scales)]
    for t_row, page, row in new_token_slots(c):
        k_new[t_row] = c.k_pages[:, page, row]
        v_new[t_row] = c.v_pages[:, page, row]
        for a in before[:2]:      # garbage a missed write would leave behind
            a[:, page, row] = 77 if a.dtype == np.int8 else np.nan
        for a in before[2:]:
            a[:, page, row] = np.nan
    return before, k_new, v_new


@pytest.mark.parametrize("qgeo", [QGEOS[0], QGEOS[1]], ids=lambda g: g.name)
@settings(max_examples=examples(3))
@given(data=st.data())
def test_write_then_attend(qgeo, data):
    qc = data.draw(qcases(qgeo))
    c = qc.case
    before, k_new, v_new = _split_new_tokens(qc)
    meta = (c.kv_lens, c.page_indices, c.cu_q_lens, c.num_seqs)
    want = ref.write_kv_pages(before[0], before[1], k_new, v_new, *meta, k_scales=before[2],
                              v_scales=before[3])
    new_dtype = jnp.dtype(c.geo.q_dtype)
    kn, vn = jnp.asarray(k_new, new_dtype), jnp.asarray(v_new, new_dtype)
    if new_dtype != jnp.float32:   # the reference quantizes what the kernel is given
        want = ref.write_kv_pages(before[0], before[1], np.asarray(kn, np.float32),
                                  np.asarray(vn, np.float32), *meta, k_scales=before[2],
                                  v_scales=before[3])
    for write in (write_kv_pages, write_kv_pages_xla):
        got = write(before[0], before[1], kn, vn, *meta, k_scales=before[2],
                    v_scales=before[3])
        assert len(got) == 4
        for g, w in zip(got, want):   # written rows as the reference quantizes them, others intact
            np.testing.assert_array_equal(_u8(g), _u8(w))
    k_pages, v_pages, k_scales, v_scales = (np.asarray(a) for a in got)
    written = dataclasses.replace(qc, k_pages=k_pages, v_pages=v_pages, k_scales=k_scales,
                                  v_scales=v_scales)
    if new_dtype == jnp.float32:      # the values are the float case's, so attend over them
        assert_matches(written, paged_attention(*written.args(), **written.kwargs(),
                                                block_sizes=qgeo.geo.block_sizes))


# ------------------------------------------------------------------------------------------------
# DMA races, bad input, TPU compiles
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["on_wait", "eager"])
def test_no_dma_races_with_scales(mode):
    qgeo = QGEOS[1]
    case = make_case(qgeo.geo, [1, 10, 3], [80, 23, 40], seed=7)
    qc = quantize_case(qgeo, case, seed=3)
    out = paged_attention(*qc.args(), **qc.kwargs(), block_sizes=qgeo.geo.block_sizes,
                          interpret=race_check_params(mode))
    assert not races_found()
    assert_matches(qc, out)


def _small(dtype="int8", scale_dtype=jnp.float32, page_size=16):
    hkv, p, d = 2, 4, 64
    return dict(q=jnp.zeros((4, 4, d), jnp.bfloat16),
                k_pages=jnp.zeros((hkv, p, page_size, d), dtype),
                v_pages=jnp.zeros((hkv, p, page_size, d), dtype),
                kv_lens=jnp.ones((2,), jnp.int32), page_indices=jnp.zeros((2, 2), jnp.int32),
                cu_q_lens=jnp.array([0, 1, 2], jnp.int32), num_seqs=jnp.int32(2),
                k_scales=jnp.ones((hkv, p, page_size), scale_dtype),
                v_scales=jnp.ones((hkv, p, page_size), scale_dtype))


@pytest.mark.parametrize("change, match", [
    (dict(k_scales=None), "k_scales is required"),
    (dict(v_scales=None), "v_scales is required"),
    (dict(k_scales=jnp.ones((2, 4, 8), jnp.float32)), r"k_scales must be \[Hkv, P, page_size\]"),
    (dict(v_scales=jnp.ones((2, 4, 16), jnp.int32)), "v_scales dtype"),
    (dict(v_scales=jnp.ones((2, 4, 16), jnp.bfloat16)), "v_scales dtype bfloat16 != k_scales"),
    (dict(k_pages=jnp.zeros((2, 4, 16, 64), jnp.bfloat16),
          v_pages=jnp.zeros((2, 4, 16, 64), jnp.bfloat16)), "k_scales given for a bfloat16"),
    (dict(k_pages=jnp.zeros((2, 4, 16, 64), jnp.float16),
          v_pages=jnp.zeros((2, 4, 16, 64), jnp.float16)), "k_pages dtype must be one of"),
    (dict(k_pages=jnp.zeros((2, 4, 16, 64), jnp.uint8),
          v_pages=jnp.zeros((2, 4, 16, 64), jnp.uint8)), "k_pages dtype must be one of"),
    (dict(sinks=jnp.zeros((3,), jnp.float32)), r"sinks must be \[Hq\]"),
    (dict(sinks=jnp.zeros((4,), jnp.int32)), "sinks must be floating point"),
])
@pytest.mark.parametrize("fn", [paged_attention, paged_attention_xla], ids=["kernel", "xla"])
def test_bad_scales_and_sinks_raise_before_any_kernel(fn, change, match):
    kw = _small()
    kw.update(change)
    args = [kw.pop(k) for k in ("q", "k_pages", "v_pages", "kv_lens", "page_indices",
                                "cu_q_lens", "num_seqs")]
    with pytest.raises(ValueError, match=match):
        fn(*args, **kw)


def test_quantized_page_size_and_write_errors():
    kw = _small(page_size=48)
    args = [kw.pop(k) for k in ("q", "k_pages", "v_pages", "kv_lens", "page_indices",
                                "cu_q_lens", "num_seqs")]
    with pytest.raises(ValueError, match="page_size=48 not supported for a int8 cache"):
        paged_attention(*args, **kw)
    kw = _small()
    new = jnp.zeros((2, 2, 64), jnp.int8)
    meta = (kw["kv_lens"], kw["page_indices"], kw["cu_q_lens"], kw["num_seqs"])
    for write in (write_kv_pages, write_kv_pages_xla):
        with pytest.raises(ValueError, match="k_new dtype must be one of"):
            write(kw["k_pages"], kw["v_pages"], new, new, *meta, k_scales=kw["k_scales"],
                  v_scales=kw["v_scales"])
        with pytest.raises(ValueError, match="k_scales is required"):
            write(kw["k_pages"], kw["v_pages"], new.astype(jnp.bfloat16),
                  new.astype(jnp.bfloat16), *meta)


def _llama_quant_specs(num_seqs, q_len, ctx, page_size, cache_dtype, scale_dtype=jnp.float32):
    sd = jax.ShapeDtypeStruct
    hkv, g, d = 8, 4, 128
    pps = ctx // page_size
    pages = num_seqs * pps
    return (sd((num_seqs * q_len, hkv * g, d), jnp.bfloat16),
            sd((hkv, pages, page_size, d), cache_dtype), sd((hkv, pages, page_size, d), cache_dtype),
            sd((num_seqs,), jnp.int32), sd((num_seqs, pps), jnp.int32),
            sd((num_seqs + 1,), jnp.int32), sd((1,), jnp.int32),
            sd((hkv, pages, page_size), scale_dtype), sd((hkv, pages, page_size), scale_dtype))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("cache_dtype, page_size, q_len, sinks", [
    ("int8", 16, 16, False), ("float8_e4m3fn", 64, 1, True), ("float8_e5m2", 16, 16, True),
])
def test_aot_compiles_for_tpu(chip, cache_dtype, page_size, q_len, sinks):
    *specs, ks, vs = _llama_quant_specs(8, q_len, 4096, page_size, jnp.dtype(cache_dtype))
    sink = jax.ShapeDtypeStruct((32,), jnp.float32) if sinks else None

    def fn(*a):
        *a, ks, vs, sk = a
        return paged_attention(*a, k_scales=ks, v_scales=vs, sinks=sk, chip=chip,
                               interpret=False)

    compiled = aot_compile(fn, *specs, ks, vs, sink, chip=chip)
    assert "dflash_paged_attention" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_plain_cache_with_sinks_and_quantized_write_compile_for_tpu(chip):
    q, k, v, kv_lens, table, cu, n, ks, vs = _llama_quant_specs(8, 16, 4096, 16, jnp.int8)
    kb = jax.ShapeDtypeStruct(k.shape, jnp.bfloat16)
    sink = jax.ShapeDtypeStruct((32,), jnp.float32)
    compiled = aot_compile(lambda *a: paged_attention(*a[:7], sinks=a[7], chip=chip,
                                                      interpret=False),
                           q, kb, kb, kv_lens, table, cu, n, sink, chip=chip)
    assert "dflash_paged_attention" in compiled.as_text()
    new = jax.ShapeDtypeStruct((q.shape[0], 8, 128), jnp.bfloat16)
    compiled = aot_compile(lambda k, v, ks, vs, kn, vn, *m: write_kv_pages(
        k, v, kn, vn, *m, k_scales=ks, v_scales=vs, interpret=False),
        k, v, ks, vs, new, new, kv_lens, table, cu, n, chip=chip)
    assert "dflash_write_kv_pages" in compiled.as_text()


@settings(max_examples=examples(20))
@given(page_size=st.sampled_from([16, 32, 64, 128]), window=st.integers(1, 600),
       kv_len=st.integers(1, 1024), q_len=st.integers(1, 16), kv_tokens=st.sampled_from(
           [128, 512, 2048]))
def test_8bit_kv_blocks_start_on_scale_granules(page_size, window, kv_len, q_len, kv_tokens):
    # On a TPU the kernel DMAs a KV block's scales from key first_page * page_size as one
    # 128-key-aligned lane run (it tells Mosaic so with pl.multiple_of): the work list must
    # round a window's first page down to a granule, and blocks must hold whole granules.
    # (The interpreter ignores alignment: this is checked on the plan itself.)
    from pallas_ops.paged.block_sizes import resolve
    from pallas_ops.paged.call import SCALE_LANES, scale_page_align
    from pallas_ops.paged.plan import work_list

    q_len = min(q_len, kv_len)
    pps = -(-kv_len // page_size)
    align = scale_page_align(page_size)
    bs = resolve(B(kv_tokens=kv_tokens), chip="v5p", num_tokens=q_len, max_seqs=1,
                 num_kv_heads=8, group=4, page_size=page_size, pages_per_seq=pps,
                 page_align=align, quantized=True)
    assert bs.pages_per_block == pps or bs.pages_per_block % align == 0
    _, _, first_page, num_pages, _, _ = (np.asarray(a) for a in work_list(
        jnp.array([kv_len], jnp.int32), jnp.array([0, q_len], jnp.int32), jnp.int32(1),
        num_q_blocks=1, q_tokens=max(q_len, 1), page_size=page_size,
        pages_per_block=bs.pages_per_block, sliding_window=window, page_align=align))
    start = int(first_page[0]) * page_size
    assert start % SCALE_LANES == 0 or page_size >= SCALE_LANES
    # still covers every key the first query sees
    assert start <= max(0, kv_len - q_len - window + 1)
    assert (int(first_page[0]) + int(num_pages[0])) * page_size >= kv_len
