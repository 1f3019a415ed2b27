"""`pallas_ops.ragged_paged_attention`, the drop-in for jax's kernel of that name.

Three kinds of check:
- jax's own test grid (tests/pallas/tpu_ragged_paged_attention_test.py of jax: its sequence
  lengths, head counts, dtypes, block sizes, sliding windows and soft caps; NaN in every unused
  page and past kv_len) against jax's `ref_ragged_paged_attention` (the installed jax's) and our
  float64 reference. `ci` runs each of its named cases (both dtypes) and a rotation through its
  products (every value of every axis at least once); `thorough` the full products.
- the paged-attention property batches of tests/test_paged.py (huge page indices in unused
  slots, poisoned pages outside sliding windows, garbage padding slots) in jax's layout, against
  the float64 reference; race checks in both DMA modes.
- static errors, the block-size mapping, and TPU AOT compiles for v5e / v5p / v6e.
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention

from pallas_ops import ragged_paged_attention
from pallas_ops.execution import race_check_params, races_found
from pallas_ops.paged.ragged import kv_row_bytes, ragged_block_sizes
from reference import paged as ref
from tests.test_paged import GEOMETRIES, PROFILE, examples, make_case, ragged_batches, slow
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

THOROUGH = PROFILE == "thorough"
# Against the float64 reference, by dtype (CONTRIBUTING.md).
TOL = {"float32": dict(rtol=2e-5, atol=2e-5), "bfloat16": dict(rtol=3e-2, atol=3e-2)}
# jax's grid runs at jax's default sm_scale = 1.0: unit-normal q and K give logits of standard
# deviation sqrt(D) ~ 11 (11x those at 1/sqrt(D)), and f32 rounding of the logits grows with
# them (measured: up to 3.3e-5 off float64 on `basic`). jax's reference computes in f32 itself.
TOL_GRID = {"float32": dict(rtol=1e-4, atol=1e-4), "bfloat16": dict(rtol=3e-2, atol=3e-2)}


# ------------------------------------------------------------------------------------------------
# jax's test grid
# ------------------------------------------------------------------------------------------------

def jax_grid_case(seq_lens, num_heads, dtype, *, head_dim=128, page_size=16, num_pages=1000,
                  max_num_batched_tokens=512, max_num_seq=8, seed=1234):
    """The arrays jax's `_test_ragged_paged_attention` builds: each sequence's pages packed in
    order, NaN past kv_len and in every unused page; unused page-table slots and padding
    sequence slots as jax leaves them (0); q rows past the last sequence are NaN here (jax's are
    random: ours must not read them either)."""
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum([q for q, _ in seq_lens])]).astype(np.int32)
    kv_lens = [kv for _, kv in seq_lens]
    t = max(int(cu[-1]), max_num_batched_tokens)
    s = max(len(seq_lens), max_num_seq)
    pps = -(-max(kv_lens) // page_size)
    hq, hkv = num_heads
    q = rng.standard_normal((t, hq, head_dim)).astype(np.float32)
    q[cu[-1]:] = np.nan
    kv = np.full((num_pages, page_size, 2 * hkv, head_dim), np.nan, np.float32)
    table = np.zeros((s, pps), np.int32)
    first = 0
    for i, kv_len in enumerate(kv_lens):
        n = -(-kv_len // page_size)
        rows = rng.standard_normal((n * page_size, 2 * hkv, head_dim)).astype(np.float32)
        rows[kv_len:] = np.nan
        kv[first:first + n] = rows.reshape(n, page_size, 2 * hkv, head_dim)
        table[i, :n] = np.arange(first, first + n)
        first += n
    cu_q_lens = np.zeros(s + 1, np.int32)
    cu_q_lens[:len(cu)] = cu
    lens = np.zeros(s, np.int32)
    lens[:len(kv_lens)] = kv_lens
    dt = jnp.dtype(dtype)
    return (jnp.asarray(q, dt), jnp.asarray(kv, dt), jnp.asarray(lens), jnp.asarray(table),
            jnp.asarray(cu_q_lens), jnp.asarray([len(seq_lens)], jnp.int32)), int(cu[-1])


def _complex_lens(num_seqs):
    rng = np.random.default_rng(1234)
    q_lens = rng.integers(1, 100, num_seqs)
    kv_lens = q_lens + rng.integers(0, 50, num_seqs)
    return list(zip(q_lens.tolist(), kv_lens.tolist()))


_BASIC = [(192, 328), (128, 180), (64, 255)]
_DECODE = [(1, 18), (1, 129), (1, 597), (1, 122), (1, 64), (1, 322), (1, 463), (1, 181),
           (1, 1107), (1, 123), (1, 31), (1, 18), (1, 1229), (1, 229), (1, 87), (1, 1328)]
_PREFILL = [(5, 18), (15, 129), (120, 597), (100, 122), (21, 64), (32, 322), (251, 463),
            (40, 181), (64, 1107), (99, 123), (10, 31), (5, 18), (3, 1229), (120, 229), (9, 87),
            (2, 1328)]
_MIXED = [(5, 18), (1, 129), (120, 597), (1, 122), (1, 64), (32, 322), (251, 463), (1, 181),
          (1, 1107), (99, 123), (1, 31), (5, 18), (3, 1229), (117, 229), (1, 87), (1, 1328)]
_DTYPES = ("float32", "bfloat16")


def _grid():
    """(id, seq_lens, num_heads, dtype, options) of jax's grid; `ci` keeps a rotation of the
    products so every value of every axis still appears."""
    out = []
    named = [("basic", _BASIC), ("decode_only", _DECODE), ("prefill_only", _PREFILL),
             ("mixed", _MIXED)]
    for name, lens in named:
        for dt in _DTYPES:      # jax's defaults for these: 8 pages and 64 queries per block
            out.append((f"{name}-{dt}", lens, (32, 8), dt,
                        dict(num_kv_pages_per_block=8, num_queries_per_block=64)))
    heads = [(32, 8), (32, 16), (16, 2), (4, 4), (8, 1)]
    complex_ = list(itertools.product([1, 5, 16], heads, _DTYPES, [4, 8], [32, 64]))
    if not THOROUGH:   # each head count once; num_seqs, dtype and block sizes rotating
        complex_ = [([1, 5, 16][i % 3], h, _DTYPES[i % 2], [4, 8][(i // 2) % 2],
                     [32, 64][(i + 1) % 2]) for i, h in enumerate(heads)]
    for n, heads, dt, kvp, qb in complex_:
        out.append((f"complex-s{n}-h{heads[0]}x{heads[1]}-{dt}-kvp{kvp}-q{qb}", _complex_lens(n),
                    heads, dt, dict(num_kv_pages_per_block=kvp, num_queries_per_block=qb)))
    window = list(itertools.product([4, 8], [32, 64], [None, 5, 128]))
    soft = list(itertools.product([4, 8], [32, 64], [None, 50.0]))
    if not THOROUGH:
        window = [(4, 32, None), (8, 64, 5), (4, 64, 128)]
        soft = [(8, 32, None), (4, 64, 50.0)]
    for kvp, qb, w in window:
        out.append((f"sliding_window-{w}-kvp{kvp}-q{qb}", _complex_lens(5), (4, 4), "float32",
                    dict(num_kv_pages_per_block=kvp, num_queries_per_block=qb, sliding_window=w)))
    for kvp, qb, c in soft:
        out.append((f"soft_cap-{c}-kvp{kvp}-q{qb}", _complex_lens(2), (16, 2), "float32",
                    dict(num_kv_pages_per_block=kvp, num_queries_per_block=qb, soft_cap=c)))
    return out


@pytest.mark.parametrize("seq_lens, num_heads, dtype, options",
                         [pytest.param(*c[1:], id=c[0]) for c in _grid()])
def test_agrees_with_jax_reference_on_jax_test_grid(seq_lens, num_heads, dtype, options):
    args, n = jax_grid_case(seq_lens, num_heads, dtype)
    pps = args[3].shape[1]
    options = dict(options, num_kv_pages_per_block=min(options["num_kv_pages_per_block"], pps))
    out = ragged_paged_attention(*args, vmem_limit_bytes=32 * 1024 * 1024, validate=True,
                                 **options)
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any(), "NaN in the output: a poisoned page or q row was read"
    assert np.all(out[n:] == 0.0), "rows past cu_q_lens[num_seqs] must be zeros"
    sem = {k: v for k, v in options.items() if k in ("sliding_window", "soft_cap")}
    theirs = np.asarray(ref_ragged_paged_attention(*args, **sem), np.float64)
    np.testing.assert_allclose(out[:n], theirs, **TOL_GRID[dtype])
    ours_f64 = ref.ragged_paged_attention(*(np.asarray(a) for a in args), **sem)
    np.testing.assert_allclose(out, ours_f64, **TOL_GRID[dtype])


# jax's grid tests the kernel's argument errors with these two:
@pytest.mark.parametrize("options, match", [
    (dict(sliding_window=0), "must be positive"),
    (dict(sliding_window=-1), "must be positive"),
    (dict(soft_cap=0.0), "must not be 0.0"),
])
def test_jax_grid_errors(options, match):
    args, _ = jax_grid_case(_BASIC, (32, 8), "float32")
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, **options)


# ------------------------------------------------------------------------------------------------
# jax's semantics beyond its grid: sm_scale default, k_scale / v_scale, soft cap sign
# ------------------------------------------------------------------------------------------------

def test_scales_and_defaults_match_jax_reference():
    # k_scale / v_scale scale K and V; a negative soft cap is the same cap (c * tanh(x / c) is
    # even in c). bf16 q and an f32 cache: jax rounds the scaled K and V to q's dtype, so the
    # bf16 tolerance (and sm_scale = 1/sqrt(D): bf16 logits of ~1, not ~11).
    args, n = jax_grid_case(_complex_lens(5), (16, 2), "float32", max_num_batched_tokens=0)
    args = (args[0].astype(jnp.bfloat16),) + args[1:]
    host = [np.asarray(a) for a in args]
    blocks = dict(num_kv_pages_per_block=4, num_queries_per_block=32)
    opts = dict(sm_scale=128 ** -0.5, k_scale=0.37, v_scale=1.9, soft_cap=-2.0)
    out = np.asarray(ragged_paged_attention(*args, **blocks, **opts), np.float64)
    theirs = np.asarray(ref_ragged_paged_attention(*args, **opts), np.float64)
    np.testing.assert_allclose(out[:n], theirs, **TOL["bfloat16"])
    np.testing.assert_allclose(out, ref.ragged_paged_attention(*host, **opts), **TOL["bfloat16"])
    # Without the scales the output differs (they are not ignored), ...
    unscaled = ref.ragged_paged_attention(*host, sm_scale=128 ** -0.5, soft_cap=2.0)
    assert not np.allclose(out, unscaled, **TOL["bfloat16"])
    # ... and sm_scale defaults to jax's 1.0, not 1/sqrt(D).
    plain = np.asarray(ragged_paged_attention(*args, **blocks), np.float64)
    np.testing.assert_allclose(plain, ref.ragged_paged_attention(*host, sm_scale=1.0),
                               **TOL["bfloat16"])
    assert not np.allclose(plain, ref.ragged_paged_attention(*host, sm_scale=128 ** -0.5),
                           **TOL["bfloat16"])


# ------------------------------------------------------------------------------------------------
# The paged-attention property batches, in jax's layout
# ------------------------------------------------------------------------------------------------

def interleave(k_pages, v_pages):
    """[Hkv, P, page_size, D] x 2 -> jax's [P, page_size, 2 * Hkv, D], K at 2h, V at 2h + 1."""
    kv = np.stack([k_pages, v_pages], axis=3)                  # [Hkv, P, ps, 2, D]
    hkv, p, ps, _, d = kv.shape
    return np.ascontiguousarray(np.transpose(kv, (1, 2, 0, 3, 4))).reshape(p, ps, 2 * hkv, d)


def _ragged_args(case):
    return (case.q, interleave(case.k_pages, case.v_pages), case.kv_lens, case.page_indices,
            case.cu_q_lens, case.num_seqs)


def _ragged_options(geo):
    bs = geo.block_sizes
    return dict(sm_scale=geo.head_dim ** -0.5, soft_cap=geo.soft_cap,
                sliding_window=geo.sliding_window,
                num_kv_pages_per_block=None if bs is None else bs.kv_tokens // geo.page_size,
                num_queries_per_block=None if bs is None else bs.q_tokens)


def _check(case, out):
    tol = TOL["bfloat16" if "bfloat16" in (case.geo.kv_dtype, case.geo.q_dtype) else "float32"]
    out = np.asarray(out, np.float64)
    assert not np.isnan(out).any(), "NaN in the output: a poisoned page/row was read"
    np.testing.assert_allclose(out, ref.paged_attention(*case.args(), **case.geo.options()), **tol)
    assert np.all(out[case.cu_q_lens[case.num_seqs[0]]:] == 0.0)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.name)
@settings(max_examples=examples(2))
@given(data=st.data())
def test_property_batches_match_reference(geo, data):
    case = data.draw(ragged_batches(geo))
    _check(case, ragged_paged_attention(*_ragged_args(case), **_ragged_options(geo)))


@pytest.mark.parametrize("geo, mode", [
    (GEOMETRIES[0], "on_wait"),
    (GEOMETRIES[0], "eager"),
    (GEOMETRIES[3], "eager"),
    (GEOMETRIES[3], "on_wait"),
], ids=lambda x: x.name if not isinstance(x, str) else x)
def test_no_dma_races(geo, mode):
    # A decode row at full capacity, a verify block crossing q blocks, a page boundary, a tail.
    q_lens = [1, 10, 1, 3][: geo.max_seqs]
    kv_lens = [geo.capacity, 23, 16, 40][: geo.max_seqs]
    case = make_case(geo, q_lens, kv_lens, seed=7)
    out = ragged_paged_attention(*_ragged_args(case), **_ragged_options(geo),
                                 interpret=race_check_params(mode))
    out = jax.block_until_ready(out)
    assert not races_found()
    _check(case, out)


# ------------------------------------------------------------------------------------------------
# Static errors and the block-size mapping
# ------------------------------------------------------------------------------------------------

def _valid():
    case = make_case(GEOMETRIES[0], [1, 10], [20, 40], seed=0)
    return list(_ragged_args(case))


def _replace(i, x):
    a = _valid()
    a[i] = x
    return a


@pytest.mark.parametrize("args, options, match", [
    (_replace(1, np.zeros((19, 16, 4, 128), np.float16)), {}, "kv_pages dtype"),
    (_replace(1, np.zeros((19, 16, 3, 128), np.float32)), {}, "must be even"),
    (_replace(1, np.zeros((19, 16, 128), np.float32)), {}, "kv_pages must be"),
    (_replace(1, np.zeros((19, 8, 4, 128), np.float32)), {}, "page_size=8"),
    (_replace(0, np.zeros((32, 8, 64), np.float32)), {}, "q head dim 64"),
    (_replace(5, np.zeros((2,), np.int32)), {}, "num_seqs"),
    (_valid(), dict(mask_value=-1.0), "mask_value"),
    (_valid(), dict(k_scale=float("nan")), "k_scale"),
    (_valid(), dict(num_kv_pages_per_block=5), r"num_kv_pages_per_block=5 must be in range \(0, 4\]"),
    (_valid(), dict(num_kv_pages_per_block=0), "num_kv_pages_per_block"),
    (_valid(), dict(num_queries_per_block=0), "num_queries_per_block"),
    (_valid(), dict(vmem_limit_bytes=1024), "vmem_limit_bytes"),
    (_valid(), dict(chip="v9"), "chip"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_static_errors_name_the_argument(args, options, match):
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(*args, **options)


def test_fp8_cache_is_refused_before_any_kernel():
    args = _valid()
    args[1] = np.zeros((19, 16, 4, 128), jnp.float8_e4m3fn)
    with pytest.raises(ValueError, match="quantized caches are not supported"):
        ragged_paged_attention(*args, k_scale=0.5, v_scale=0.5)


@pytest.mark.parametrize("kv_pages, q_blk, group, want", [
    (8, 64, 4, (128, 64)),      # jax's test defaults, pages of 16: 128 keys, 64 queries
    (4, 32, 1, (64, 32)),
    (2, 1, 4, (32, 2)),         # q_tokens * G must fill 8 sublanes: 1 query -> 2 at G = 4
    (2, 3, 1, (32, 8)),         # 3 -> 8 at G = 1
    (None, None, 4, (1024, None)),   # both from our tables (v5p: 1024 keys per block)
])
def test_block_size_mapping(kv_pages, q_blk, group, want):
    bs = ragged_block_sizes(num_kv_pages_per_block=kv_pages, num_queries_per_block=q_blk,
                            page_size=16, group=group, chip="v5p")
    assert (bs.kv_tokens, bs.q_tokens) == want


def test_table_block_shrinks_for_wide_heads():
    # 32 bf16 KV heads, D = 128: 48 KiB of VMEM per key (two slots and the 32-bit words), so
    # the table's 1024 keys (48 MiB) become 512; a given block size is taken as it is.
    row = kv_row_bytes("bfloat16", 32, 128)
    assert row == 3 * 2 * 32 * 128 * 2
    auto = ragged_block_sizes(num_kv_pages_per_block=None, num_queries_per_block=None,
                              page_size=16, group=1, chip="v5p", kv_row_bytes=row)
    assert auto.kv_tokens == 512
    given = ragged_block_sizes(num_kv_pages_per_block=64, num_queries_per_block=None,
                               page_size=16, group=1, chip="v5p", kv_row_bytes=row)
    assert given.kv_tokens == 1024


# ------------------------------------------------------------------------------------------------
# TPU AOT compile at Llama-3.1-8B shapes (bf16 and f32, every head count of jax's grid)
# ------------------------------------------------------------------------------------------------

def _specs(num_seqs, q_len, ctx, page_size, hq=32, hkv=8, dtype=jnp.bfloat16):
    pps = ctx // page_size
    sd = jax.ShapeDtypeStruct
    return (sd((num_seqs * q_len, hq, 128), dtype), sd((num_seqs * pps, page_size, 2 * hkv, 128),
                                                       dtype),
            sd((num_seqs,), jnp.int32), sd((num_seqs, pps), jnp.int32),
            sd((num_seqs + 1,), jnp.int32), sd((1,), jnp.int32))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("workload", [
    ("verify16-b8-ctx4096-p16", (8, 16, 4096, 16)),
    ("decode-b64-ctx4096-p16-f32", (64, 1, 4096, 16), dict(dtype=jnp.float32)),
    # 16 KV heads (32 rows per token), one q block: v5p halves the q block for its two cores
    ("decode-b8-ctx1024-p16-h32x16", (8, 1, 1024, 16), dict(hq=32, hkv=16)),
    # 1 KV head: 2 rows per token (XLA tiles the cache (2, 128))
    ("verify8-b8-ctx1024-p16-h8x1", (8, 8, 1024, 16), dict(hq=8, hkv=1)),
    pytest.param(("decode-b8-ctx4096-p64", (8, 1, 4096, 64)), marks=slow),
    pytest.param(("decode-b8-ctx1024-p16-h32x16-f32", (8, 1, 1024, 16),
                  dict(hq=32, hkv=16, dtype=jnp.float32)), marks=slow),
], ids=lambda w: w[0])
def test_aot_compiles_for_tpu(chip, workload):
    specs = _specs(*workload[1], **(workload[2] if len(workload) > 2 else {}))
    compiled = aot_compile(lambda *a: ragged_paged_attention(*a, chip=chip, interpret=False),
                           *specs, chip=chip)
    assert "dflash_ragged_paged_attention" in compiled.as_text()
