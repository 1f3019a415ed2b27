"""Property tests of the Pallas ragged paged attention (and the jnp version) against the reference.

Batches: only the geometry (shapes, dtypes, options, block sizes) is static, so each geometry
compiles once; sequence count, q/kv lengths, page tables and values are data drawn per example.
Everything the kernel must not read is poisoned: unused pages and rows past kv_len in a
sequence's last page are NaN, pages wholly outside a sliding window are NaN, page-table slots a
sequence does not need hold huge indices, q rows past cu_q_lens[num_seqs] are NaN, and padding
sequence slots hold garbage lengths (kv_lens and cu_q_lens entries past num_seqs). The
interpreter (`out_of_bounds_reads='raise'`) turns a read of a huge page index into an error, and
a read of a NaN page into a NaN output.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from pallas_ops.execution import race_check_params, races_found
from pallas_ops.paged import (
    PagedAttentionBlockSizes,
    check_paged_attention_inputs,
    paged_attention,
    write_kv_pages,
)
from pallas_ops.paged.xla import paged_attention_xla, write_kv_pages_xla
from reference import paged as ref
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile

HUGE_PAGE = 2 ** 30
PROFILE = os.environ.get("PALLAS_DFLASH_PROFILE", "ci")


def examples(ci_count: int) -> int:
    """Hypothesis examples for an interpreted-kernel test: bounded under `ci`, 10x under thorough."""
    return ci_count if PROFILE == "ci" else 10 * ci_count


# Expensive extras: run only in the thorough profile.
slow = [pytest.mark.slow,
        pytest.mark.skipif(PROFILE != "thorough", reason="thorough profile only")]



@dataclasses.dataclass(frozen=True)
class Geometry:
    name: str
    num_kv_heads: int
    group: int
    head_dim: int
    page_size: int
    kv_dtype: str
    q_dtype: str
    num_tokens: int        # T
    max_seqs: int          # S
    pages_per_seq: int
    block_sizes: PagedAttentionBlockSizes | None
    soft_cap: float | None = None
    sliding_window: int | None = None
    spare_pages: int = 3   # pages no sequence uses (NaN)

    @property
    def num_pages(self):
        return self.max_seqs * self.pages_per_seq + self.spare_pages

    @property
    def capacity(self):
        return self.pages_per_seq * self.page_size

    def options(self):
        return dict(soft_cap=self.soft_cap, sliding_window=self.sliding_window)


B = PagedAttentionBlockSizes

GEOMETRIES = [
    # decode / verify mixes with GQA packing, 2 pages per KV block, q blocks of 8 tokens
    Geometry("g4-bf16-d128-p16", 2, 4, 128, 16, "bfloat16", "bfloat16", 32, 4, 4,
             B(kv_tokens=32, q_tokens=8)),
    # no GQA, f32 (kept f32), one page per block, one KV head per grid step
    Geometry("g1-f32-d64-p16", 2, 1, 64, 16, "float32", "float32", 32, 4, 5,
             B(kv_tokens=16, kv_heads=1, q_tokens=16)),
    # big head dim, page 32, soft cap, f32
    Geometry("g2-f32-d256-p32-softcap", 1, 2, 256, 32, "float32", "float32", 24, 3, 3,
             B(kv_tokens=64, q_tokens=8), soft_cap=5.0),
    # G = 8, sliding window: pages outside the window are NaN
    Geometry("g8-bf16-d128-p16-window", 1, 8, 128, 16, "bfloat16", "bfloat16", 16, 4, 4,
             B(kv_tokens=32, q_tokens=2), sliding_window=20),
    # prefill chunks up to 64 tokens spanning q blocks of 64 tokens (128 rows: two 64-row
    # sub-tiles, a pair computes only its own); 8 sequence slots; f32 q, bf16 KV
    Geometry("g2-mixed-d64-p16-prefill", 2, 2, 64, 16, "bfloat16", "float32", 80, 8, 6,
             B(kv_tokens=48, q_tokens=64)),
    # page 64, default block sizes (table fallback: 4 pages = 256 keys per block, the lane-repeat
    # path of production shapes), window + soft cap together
    Geometry("g4-f32-d128-p64-window-softcap", 1, 4, 128, 64, "float32", "float32", 24, 2, 4,
             None, soft_cap=10.0, sliding_window=70),
]


@dataclasses.dataclass
class Case:
    geo: Geometry
    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    kv_lens: np.ndarray
    page_indices: np.ndarray
    cu_q_lens: np.ndarray
    num_seqs: np.ndarray
    q_lens: list

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.kv_lens, self.page_indices,
                self.cu_q_lens, self.num_seqs)


def _round(x, dtype):
    import jax.numpy as jnp
    return np.asarray(jnp.asarray(x, dtype=jnp.dtype(dtype)))


@st.composite
def ragged_batches(draw, geo: Geometry, decode_only: bool = False):
    """A ragged batch for `geo`: decode rows, verify blocks (10, 16), prefill chunks, empty slots."""
    s_max, cap, ps = geo.max_seqs, geo.capacity, geo.page_size
    num_seqs = draw(st.integers(1, s_max))
    budget = geo.num_tokens
    q_lens, kv_lens = [], []
    for _ in range(num_seqs):
        if decode_only:
            q_len = 1
        else:
            q_len = draw(st.one_of(st.sampled_from([0, 1, 1, 10, 16]),
                                   st.integers(0, min(64, budget, cap))))
            q_len = min(q_len, budget, cap)
        budget -= q_len
        boundaries = [m for m in range(ps, cap + 1, ps) if m >= max(q_len, 1)]
        kv_len = draw(st.one_of(st.integers(q_len, cap),
                                st.sampled_from(boundaries),
                                st.sampled_from([min(m + 1, cap) for m in boundaries])))
        q_lens.append(q_len)
        kv_lens.append(max(kv_len, q_len))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    padded_tail = draw(st.booleans())
    return make_case(geo, q_lens, kv_lens, seed=seed, garbage_padding_slots=padded_tail)


def make_case(geo: Geometry, q_lens, kv_lens, *, seed=0, garbage_padding_slots=True,
              poison=True) -> Case:
    """Builds the arrays for explicit per-sequence lengths (len(q_lens) = num_seqs <= S)."""
    rng = np.random.default_rng(seed)
    num_seqs, s_max, ps, pps = len(q_lens), geo.max_seqs, geo.page_size, geo.pages_per_seq
    hkv, d = geo.num_kv_heads, geo.head_dim
    fill = np.nan if poison else 0.0
    k_pages = np.full((hkv, geo.num_pages, ps, d), fill, np.float32)
    v_pages = np.full((hkv, geo.num_pages, ps, d), fill, np.float32)
    table = np.full((s_max, pps), HUGE_PAGE, np.int32)
    if not poison:
        table[:] = rng.integers(0, geo.num_pages, size=table.shape)
    perm = rng.permutation(geo.num_pages)
    cu = np.zeros(s_max + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    lens = np.zeros(s_max, np.int32)
    lens[:num_seqs] = kv_lens
    if garbage_padding_slots and num_seqs < s_max:
        lens[num_seqs:] = rng.integers(1, 10 * geo.capacity, size=s_max - num_seqs)
        # cu_q_lens past num_seqs is not constrained either (not even monotone)
        cu[num_seqs + 1:] = rng.integers(0, geo.num_tokens + 1, size=s_max - num_seqs)
    for s in range(num_seqs):
        kv_len, q_len = kv_lens[s], q_lens[s]
        n_pages = -(-kv_len // ps)
        first_live = 0
        if geo.sliding_window is not None and q_len > 0:
            first_live = max(0, kv_len - q_len - geo.sliding_window + 1) // ps
        for j in range(n_pages):
            page = int(perm[s * pps + j])
            table[s, j] = page
            if j < first_live and poison:
                continue  # wholly outside every query's window: stays NaN, must not be read
            k_pages[:, page] = rng.standard_normal((hkv, ps, d))
            v_pages[:, page] = rng.standard_normal((hkv, ps, d))
            if j == n_pages - 1 and poison:
                rows = kv_len - j * ps
                k_pages[:, page, rows:] = np.nan
                v_pages[:, page, rows:] = np.nan
    q = rng.standard_normal((geo.num_tokens, hkv * geo.group, d)).astype(np.float32)
    if poison:
        q[cu[num_seqs]:] = np.nan
    return Case(geo, _round(q, geo.q_dtype), _round(k_pages, geo.kv_dtype),
                _round(v_pages, geo.kv_dtype), lens, table, cu,
                np.asarray([num_seqs], np.int32), list(q_lens))


def tolerance(geo: Geometry):
    if geo.kv_dtype == "bfloat16" or geo.q_dtype == "bfloat16":
        return dict(rtol=3e-2, atol=3e-2)
    return dict(rtol=2e-5, atol=2e-5)


def _reference(case: Case):
    return ref.paged_attention(*case.args(), **case.geo.options())


def _kernel(case: Case, interpret=None, **overrides):
    kw = dict(case.geo.options(), block_sizes=case.geo.block_sizes, interpret=interpret)
    kw.update(overrides)
    return np.asarray(paged_attention(*case.args(), **kw), np.float64)


def _assert_matches_reference(case: Case, out):
    expected = _reference(case)
    assert out.shape == expected.shape
    assert not np.isnan(out).any(), "NaN in the output: a poisoned page/row was read"
    np.testing.assert_allclose(out, expected, **tolerance(case.geo))
    n_rows = case.cu_q_lens[case.num_seqs[0]]
    assert np.all(out[n_rows:] == 0.0), "padding rows must be zeros"


# ------------------------------------------------------------------------------------------------
# Kernel vs reference (interpreter)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.name)
@settings(max_examples=examples(3))
@given(data=st.data())
def test_kernel_matches_reference(geo, data):
    case = data.draw(ragged_batches(geo))
    check_paged_attention_inputs(case.q, case.k_pages, case.kv_lens, case.page_indices,
                                 case.cu_q_lens, case.num_seqs)
    _assert_matches_reference(case, _kernel(case))


@pytest.mark.parametrize("geo, mode", [
    (GEOMETRIES[0], "on_wait"),
    (GEOMETRIES[0], "eager"),
    (GEOMETRIES[3], "eager"),
    pytest.param(GEOMETRIES[3], "on_wait", marks=slow),
], ids=lambda x: x.name if isinstance(x, Geometry) else x)
def test_no_dma_races(geo, mode):
    # Two decode rows, a verify block crossing q blocks, a tail page, a full page boundary.
    q_lens = [1, 10, 1, 3][: geo.max_seqs]
    kv_lens = [geo.capacity, 23, 16, 40][: geo.max_seqs]
    case = make_case(geo, q_lens, kv_lens, seed=7)
    out = _kernel(case, interpret=race_check_params(mode))
    assert not races_found()
    _assert_matches_reference(case, out)


def test_exact_page_boundaries_and_full_capacity():
    geo = GEOMETRIES[0]
    ps, cap = geo.page_size, geo.capacity
    case = make_case(geo, [1, 16, 1, 2], [cap, 2 * ps, ps, ps + 1], seed=3)
    _assert_matches_reference(case, _kernel(case))


@pytest.mark.parametrize("geo", [GEOMETRIES[3], GEOMETRIES[5]], ids=lambda g: g.name)
def test_window_edge_on_a_page_boundary(geo):
    # Decode rows whose first visible key (position p - W + 1) is the first row of a page, the
    # row before it (the last row of the previous page) or the row after it. Pages wholly left
    # of the window are NaN: loading one more page poisons the output, one page fewer drops a
    # key the query sees.
    w, ps = geo.sliding_window, geo.page_size
    deltas = [0, -1, 1, 0][: geo.max_seqs]
    kv_lens = [(1 + s % 2) * ps + w + delta for s, delta in enumerate(deltas)]   # p = kv_len-1
    assert max(kv_lens) <= geo.capacity
    case = make_case(geo, [1] * len(deltas), kv_lens, seed=13)
    _assert_matches_reference(case, _kernel(case))
    xla = _jitted_xla_attention(geo.soft_cap, geo.sliding_window, 16)(*case.args())
    _assert_matches_reference(case, np.asarray(xla, np.float64))


def test_zero_sequences_in_use_gives_zeros():
    geo = GEOMETRIES[0]
    case = make_case(geo, [], [], seed=1)
    out = _kernel(case)
    assert np.all(out == 0.0)


def test_f32_kv_is_not_rounded_to_bf16():
    # Values that bf16 cannot represent: a kernel rounding f32 KV to bf16 misses by ~1e-3.
    geo = GEOMETRIES[1]
    case = make_case(geo, [3, 1], [37, 50], seed=5)
    case.v_pages = case.v_pages + np.float32(1e-3) * np.float32(np.pi)
    out = _kernel(case)
    np.testing.assert_allclose(out, _reference(case), rtol=1e-5, atol=1e-5)


def test_agrees_with_jax_bundled_paged_attention_on_decode():
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as jax_paged

    # The geometry of the first property test (its compiled kernel is reused); four decode rows.
    geo = GEOMETRIES[0]
    # jax's kernel reads every page of a compute block and masks additively, so it needs finite
    # data everywhere and in-range page indices.
    case = make_case(geo, [1, 1, 1, 1], [64, 17, 32, 5], seed=11, poison=False)
    ours = _kernel(case)[:4]
    np.testing.assert_allclose(ours, _reference(case)[:4], **tolerance(geo))
    # jax's kernel takes pre-scaled queries (it applies no 1/sqrt(D) itself).
    q_scaled = (jnp.asarray(case.q[:4], jnp.float32) / np.sqrt(geo.head_dim)).astype(jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
        theirs = jax_paged(q_scaled, jnp.asarray(case.k_pages),
                           jnp.asarray(case.v_pages), jnp.asarray(case.kv_lens),
                           jnp.asarray(case.page_indices), pages_per_compute_block=2)
    theirs = np.asarray(theirs, np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------------------------
# write_kv_pages
# ------------------------------------------------------------------------------------------------

def new_token_slots(case: Case):
    """(q row, page, row in page) of every sequence's last q_len tokens (the new ones)."""
    ps = case.geo.page_size
    for s, q_len in enumerate(case.q_lens):
        for i in range(q_len):
            pos = case.kv_lens[s] - q_len + i
            yield case.cu_q_lens[s] + i, case.page_indices[s, pos // ps], pos % ps


def _split_new_tokens(case: Case):
    """Moves each sequence's last q_len keys/values out of the pages into k_new/v_new [T, Hkv, D]
    and poisons their slots in the pages; returns (k_pages_before, v_pages_before, k_new, v_new)."""
    geo = case.geo
    t, hkv, d = geo.num_tokens, geo.num_kv_heads, geo.head_dim
    k_new = np.full((t, hkv, d), np.nan, case.k_pages.dtype)
    v_new = np.full((t, hkv, d), np.nan, case.v_pages.dtype)
    k_before, v_before = case.k_pages.copy(), case.v_pages.copy()
    for t_row, page, row in new_token_slots(case):
        k_new[t_row] = case.k_pages[:, page, row]
        v_new[t_row] = case.v_pages[:, page, row]
        k_before[:, page, row] = np.nan
        v_before[:, page, row] = np.nan
    return k_before, v_before, k_new, v_new


def _bits(x):
    x = np.asarray(x)
    return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


@pytest.mark.parametrize("geo", [GEOMETRIES[0], GEOMETRIES[1]], ids=lambda g: g.name)
@settings(max_examples=examples(3))
@given(data=st.data())
def test_write_then_attend_matches_reference(geo, data):
    case = data.draw(ragged_batches(geo))
    k_before, v_before, k_new, v_new = _split_new_tokens(case)
    meta = (case.kv_lens, case.page_indices, case.cu_q_lens, case.num_seqs)
    k_after, v_after = write_kv_pages(k_before, v_before, k_new, v_new, *meta)
    k_after, v_after = np.asarray(k_after), np.asarray(v_after)
    # Exactly the pages' new rows changed: the result is bit-identical to the full cache.
    np.testing.assert_array_equal(_bits(k_after), _bits(case.k_pages))
    np.testing.assert_array_equal(_bits(v_after), _bits(case.v_pages))
    k_ref, v_ref = ref.write_kv_pages(k_before, v_before, k_new, v_new, *meta)
    np.testing.assert_array_equal(_bits(k_after), _bits(k_ref.astype(k_after.dtype)))
    written = dataclasses.replace(case, k_pages=k_after, v_pages=v_after)
    _assert_matches_reference(written, _kernel(written))


def test_write_kv_pages_across_token_blocks():
    # 136 new rows: two token blocks of 128. Sequence 0's tokens 124..129 share one page (page
    # slot 8, positions 128..133), so that page's run straddles the block boundary at token 128
    # and must be split there; sequence 1 is one decode row; rows 131.. are padding (NaN).
    geo = Geometry("g1-bf16-d64-p16-t136", 1, 1, 64, 16, "bfloat16", "bfloat16", 136, 2, 10, None)
    case = make_case(geo, [130, 1], [134, 20], seed=4)
    k_before, v_before, k_new, v_new = _split_new_tokens(case)
    meta = (case.kv_lens, case.page_indices, case.cu_q_lens, case.num_seqs)
    for write in (write_kv_pages, _jitted_xla_write):
        k_after, v_after = write(k_before, v_before, k_new, v_new, *meta)
        np.testing.assert_array_equal(_bits(k_after), _bits(case.k_pages))
        np.testing.assert_array_equal(_bits(v_after), _bits(case.v_pages))


def test_write_kv_pages_no_dma_races():
    geo = GEOMETRIES[0]
    case = make_case(geo, [1, 10, 16, 3], [64, 23, 16, 40], seed=2)
    k_before, v_before, k_new, v_new = _split_new_tokens(case)
    for mode in ("on_wait", "eager"):
        params = race_check_params(mode)
        k_after, v_after = write_kv_pages(k_before, v_before, k_new, v_new, case.kv_lens,
                                          case.page_indices, case.cu_q_lens, case.num_seqs,
                                          interpret=params)
        k_after, v_after = jax.block_until_ready((k_after, v_after))
        assert not races_found()
        np.testing.assert_array_equal(_bits(k_after), _bits(case.k_pages))
        np.testing.assert_array_equal(_bits(v_after), _bits(case.v_pages))


# ------------------------------------------------------------------------------------------------
# The jnp (XLA) version: same contract, much faster, so more examples
# ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _jitted_xla_attention(soft_cap, sliding_window, rows_per_chunk):
    return jax.jit(functools.partial(paged_attention_xla, soft_cap=soft_cap,
                                     sliding_window=sliding_window,
                                     rows_per_chunk=rows_per_chunk))


_jitted_xla_write = jax.jit(write_kv_pages_xla)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.name)
@settings(max_examples=examples(10))
@given(data=st.data())
def test_xla_version_matches_reference(geo, data):
    case = data.draw(ragged_batches(geo))
    # rows per gather: 1 (one chunk per row), 4 (chunks split sequences and vectorize), 16
    rows_per_chunk = data.draw(st.sampled_from([1, 4, 16]), label="rows_per_chunk")
    out = _jitted_xla_attention(geo.soft_cap, geo.sliding_window, rows_per_chunk)(*case.args())
    _assert_matches_reference(case, np.asarray(out, np.float64))
    k_before, v_before, k_new, v_new = _split_new_tokens(case)
    k_after, v_after = _jitted_xla_write(
        k_before, v_before, k_new, v_new, case.kv_lens, case.page_indices, case.cu_q_lens,
        case.num_seqs)
    np.testing.assert_array_equal(_bits(k_after), _bits(case.k_pages))
    np.testing.assert_array_equal(_bits(v_after), _bits(case.v_pages))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _valid_args():
    case = make_case(GEOMETRIES[0], [1, 10], [20, 40], seed=0)
    return list(case.args())


def _with(**changes):
    names = ["q", "k_pages", "v_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs"]
    args = dict(zip(names, _valid_args()))
    args.update(changes)
    return [args[n] for n in names]


_PAGES_D96 = np.zeros((2, 19, 16, 96), np.float32)
_PAGES_P8 = np.zeros((2, 19, 8, 128), np.float32)
_PAGES_1KV = np.zeros((1, 19, 16, 128), np.float32)


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_xla])
@pytest.mark.parametrize("args, match", [
    (_with(q=np.zeros((4, 8), np.float32)), "q must be"),
    (_with(q=np.zeros((32, 8, 128), np.int32)), "q dtype"),
    (_with(q=np.zeros((32, 3, 128), np.float32)), "not a multiple"),        # Hq 3, Hkv 2
    (_with(q=np.zeros((32, 16, 128), np.float32), k_pages=_PAGES_1KV, v_pages=_PAGES_1KV), "G=16"),
    (_with(q=np.zeros((32, 8, 64), np.float32)), "q head dim 64"),
    (_with(q=np.zeros((32, 8, 96), np.float32), k_pages=_PAGES_D96, v_pages=_PAGES_D96),
     "head dim D=96"),
    (_with(k_pages=_PAGES_P8, v_pages=_PAGES_P8), "page_size=8"),
    (_with(v_pages=np.zeros((2, 19, 16, 128), np.float16)), "v_pages dtype"),
    (_with(v_pages=np.zeros((2, 18, 16, 128), np.float32)), "v_pages shape"),
    (_with(kv_lens=np.zeros((4,), np.int64)), "kv_lens must be int32"),
    (_with(page_indices=np.zeros((3, 4), np.int32)), "page_indices has 3 rows"),
    (_with(cu_q_lens=np.zeros((4,), np.int32)), "cu_q_lens must have"),
    (_with(num_seqs=np.zeros((2,), np.int32)), "num_seqs"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_static_errors_name_the_argument(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


@pytest.mark.parametrize("kw, match", [
    (dict(soft_cap=-1.0), "soft_cap"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sm_scale=0.0), "sm_scale"),
    (dict(block_sizes=PagedAttentionBlockSizes(kv_heads=3)), "kv_heads=3 must divide"),
    (dict(block_sizes=PagedAttentionBlockSizes(q_tokens=1)), "multiple of 8"),
    (dict(chip="v9"), "chip"),
])
def test_static_option_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        paged_attention(*_valid_args(), **kw)


def test_block_sizes_validate_themselves():
    with pytest.raises(ValueError, match="kv_tokens"):
        PagedAttentionBlockSizes(kv_tokens=100)
    with pytest.raises(ValueError, match="q_tokens"):
        PagedAttentionBlockSizes(q_tokens=0)


def test_write_kv_pages_static_errors():
    case = make_case(GEOMETRIES[0], [1, 10], [20, 40], seed=0)
    k_new = np.zeros((32, 2, 128), case.k_pages.dtype)
    meta = (case.kv_lens, case.page_indices, case.cu_q_lens, case.num_seqs)
    with pytest.raises(ValueError, match="k_new must be"):
        write_kv_pages(case.k_pages, case.v_pages, k_new[:, :1], k_new[:, :1], *meta)
    with pytest.raises(ValueError, match="k_new dtype"):
        write_kv_pages(case.k_pages, case.v_pages, k_new.astype(np.float32), k_new, *meta)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a["page_indices"].__setitem__((1, 2), 10 ** 6), r"page_indices\[1, 2\]"),
    (lambda a: a["page_indices"].__setitem__((0, 0), -1), r"page_indices\[0, 0\]"),
    (lambda a: a["kv_lens"].__setitem__(1, 5), "kv_lens=5 < q_len=10"),
    (lambda a: a["kv_lens"].__setitem__(0, 65), "exceeds the page-table capacity"),
    (lambda a: a["cu_q_lens"].__setitem__(1, 12), "non-decreasing"),
    (lambda a: a["cu_q_lens"].__setitem__(2, 40), "exceeds the 32 rows"),
    (lambda a: a["num_seqs"].__setitem__(0, 5), "num_seqs=5"),
])
def test_validate_rejects_bad_dynamic_input(mutate, match):
    case = make_case(GEOMETRIES[0], [1, 10], [20, 40], seed=0)
    arrays = dict(kv_lens=case.kv_lens.copy(), page_indices=case.page_indices.copy(),
                  cu_q_lens=case.cu_q_lens.copy(), num_seqs=case.num_seqs.copy())
    # The untouched case passes validation, huge indices in unused slots included.
    check_paged_attention_inputs(case.q, case.k_pages, **arrays)
    mutate(arrays)
    with pytest.raises(ValueError, match=match):
        paged_attention(case.q, case.k_pages, case.v_pages, arrays["kv_lens"],
                        arrays["page_indices"], arrays["cu_q_lens"], arrays["num_seqs"],
                        validate=True)
    with pytest.raises(ValueError, match=match):
        paged_attention_xla(case.q, case.k_pages, case.v_pages, arrays["kv_lens"],
                            arrays["page_indices"], arrays["cu_q_lens"], arrays["num_seqs"],
                            validate=True)


# ------------------------------------------------------------------------------------------------
# TPU AOT compile (real Mosaic through libtpu) at Llama-3.1-8B shapes
# ------------------------------------------------------------------------------------------------

def _llama_specs(num_seqs, q_len, ctx, page_size, dtype=jnp.bfloat16):
    hkv, g, d = 8, 4, 128
    pps = ctx // page_size
    sd = jax.ShapeDtypeStruct
    return (sd((num_seqs * q_len, hkv * g, d), dtype),
            sd((hkv, num_seqs * pps, page_size, d), dtype),
            sd((hkv, num_seqs * pps, page_size, d), dtype),
            sd((num_seqs,), jnp.int32), sd((num_seqs, pps), jnp.int32),
            sd((num_seqs + 1,), jnp.int32), sd((1,), jnp.int32))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
@pytest.mark.parametrize("workload", [
    ("verify16-b8-ctx4096", 8, 16, 4096, 16),
    ("verify16-b8-ctx4096", 8, 16, 4096, 64),
    ("decode-b64-ctx4096", 64, 1, 4096, 16),
    pytest.param(("decode-b64-ctx4096", 64, 1, 4096, 64), marks=slow),
], ids=lambda w: f"{w[0]}-p{w[4]}")
def test_aot_compiles_for_tpu(chip, workload):
    _, num_seqs, q_len, ctx, page_size = workload
    specs = _llama_specs(num_seqs, q_len, ctx, page_size)
    compiled = aot_compile(lambda *a: paged_attention(*a, chip=chip, interpret=False), *specs,
                           chip=chip)
    assert "dflash_paged_attention" in compiled.as_text()


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_write_kv_pages_aot_compiles_for_tpu(chip):
    q, k, v, kv_lens, table, cu, n = _llama_specs(8, 16, 4096, 16)
    new = jax.ShapeDtypeStruct((q.shape[0], 8, 128), q.dtype)
    compiled = aot_compile(lambda k, v, kn, vn, *m: write_kv_pages(k, v, kn, vn, *m,
                                                                    interpret=False),
                           k, v, new, new, kv_lens, table, cu, n, chip=chip)
    assert "dflash_write_kv_pages" in compiled.as_text()
