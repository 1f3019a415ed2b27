"""Input validation shared by `paged_attention` / `write_kv_pages` (Pallas and XLA versions) and
`ragged_paged_attention` (jax's interleaved layout).

Two layers, as CONTRIBUTING.md asks:
- `check_static_*`: facts known at trace time (ranks, shapes, dtypes, head grouping, head dim,
  page size, option values). They raise `ValueError` naming the argument before any kernel runs.
- `check_paged_attention_inputs`: dynamic facts that need the device data (page indices in range
  where used, kv_len >= q_len, kv_len <= capacity, cu_q_lens monotone, num_seqs in range). Runs on
  the host (NumPy); the wrappers call it when given `validate=True`
  (`check_ragged_paged_attention_inputs` for the interleaved layout).
"""
from __future__ import annotations

import dataclasses

import numpy as np

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_GROUPS = (1, 2, 4, 8)
SUPPORTED_DTYPES = ("bfloat16", "float32")
QUANTIZED_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")   # pages with per-token scales
SCALE_DTYPES = ("float32", "bfloat16")
QUANTIZED_PAGE_SIZES = (16, 32, 64, 128, 256)   # 8-bit caches: whole pages per 128-key granule
MIN_PAGE_SIZE = 16
MAX_PAGE_SIZE = 256


@dataclasses.dataclass(frozen=True)
class PagedGeometry:
    """Static geometry of one call, derived from the argument shapes."""
    num_tokens: int       # T: rows of q
    num_q_heads: int      # Hq
    num_kv_heads: int     # Hkv
    group: int            # G = Hq // Hkv
    head_dim: int         # D
    total_pages: int      # P
    page_size: int
    max_seqs: int         # S: slots of kv_lens / page_indices
    pages_per_seq: int


def _dtype_name(x) -> str:
    return np.dtype(x.dtype).name


def _check_int32(name, x, ndim):
    if np.dtype(x.dtype) != np.int32:
        raise ValueError(f"{name} must be int32, got {np.dtype(x.dtype).name}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {tuple(x.shape)}")


def check_static_pages(k_pages, v_pages) -> tuple[int, int, int, int]:
    """Checks k_pages/v_pages: returns (Hkv, P, page_size, D)."""
    if len(k_pages.shape) != 4:
        raise ValueError(f"k_pages must be [Hkv, P, page_size, D], got shape {tuple(k_pages.shape)}")
    if tuple(v_pages.shape) != tuple(k_pages.shape):
        raise ValueError(f"v_pages shape {tuple(v_pages.shape)} != k_pages shape "
                         f"{tuple(k_pages.shape)}")
    if _dtype_name(k_pages) not in SUPPORTED_DTYPES + QUANTIZED_DTYPES:
        raise ValueError(f"k_pages dtype must be one of {SUPPORTED_DTYPES + QUANTIZED_DTYPES}, "
                         f"got {_dtype_name(k_pages)}")
    if _dtype_name(v_pages) != _dtype_name(k_pages):
        raise ValueError(f"v_pages dtype {_dtype_name(v_pages)} != k_pages dtype "
                         f"{_dtype_name(k_pages)}")
    hkv, p, page_size, d = (int(s) for s in k_pages.shape)
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"k_pages head dim D={d} not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size % 16:
        raise ValueError(f"k_pages page_size={page_size} not supported: must be a multiple of 16 "
                         f"in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")
    if hkv < 1 or p < 1:
        raise ValueError(f"k_pages must have at least one KV head and one page, got shape "
                         f"{tuple(k_pages.shape)}")
    return hkv, p, page_size, d


def check_static_scales(k_pages, k_scales, v_scales) -> bool:
    """Scales of a quantized cache: required for 8-bit pages ([Hkv, P, page_size], f32 or bf16,
    both the same dtype), refused for bf16 / f32 pages. Returns True for a quantized cache."""
    name = _dtype_name(k_pages)
    if name not in QUANTIZED_DTYPES:
        for arg, x in (("k_scales", k_scales), ("v_scales", v_scales)):
            if x is not None:
                raise ValueError(f"{arg} given for a {name} cache: scales belong to 8-bit caches "
                                 f"({', '.join(QUANTIZED_DTYPES)})")
        return False
    hkv, p, page_size, _ = (int(x) for x in k_pages.shape)
    for arg, x in (("k_scales", k_scales), ("v_scales", v_scales)):
        if x is None:
            raise ValueError(f"{arg} is required for a {name} cache: a scale per (KV head, token), "
                             f"[Hkv, P, page_size] = {(hkv, p, page_size)}")
        if tuple(x.shape) != (hkv, p, page_size):
            raise ValueError(f"{arg} must be [Hkv, P, page_size] = {(hkv, p, page_size)}, got "
                             f"shape {tuple(x.shape)}")
        if _dtype_name(x) not in SCALE_DTYPES:
            raise ValueError(f"{arg} dtype must be one of {SCALE_DTYPES}, got {_dtype_name(x)}")
    if _dtype_name(k_scales) != _dtype_name(v_scales):
        raise ValueError(f"v_scales dtype {_dtype_name(v_scales)} != k_scales dtype "
                         f"{_dtype_name(k_scales)}")
    if page_size not in QUANTIZED_PAGE_SIZES:
        raise ValueError(f"k_pages page_size={page_size} not supported for a {name} cache: must "
                         f"be one of {QUANTIZED_PAGE_SIZES}")
    return True


def check_static_sinks(sinks, num_q_heads) -> None:
    if sinks is None:
        return
    if tuple(sinks.shape) != (num_q_heads,):
        raise ValueError(f"sinks must be [Hq] = {(num_q_heads,)}, got shape {tuple(sinks.shape)}")
    if not np.issubdtype(np.dtype(sinks.dtype), np.floating):
        raise ValueError(f"sinks must be floating point (f32), got {_dtype_name(sinks)}")


def check_static_metadata(kv_lens, page_indices, cu_q_lens, num_seqs, num_tokens) -> tuple[int, int]:
    """Checks the ragged-batch metadata shapes/dtypes: returns (S, pages_per_seq)."""
    _check_int32("kv_lens", kv_lens, 1)
    _check_int32("page_indices", page_indices, 2)
    _check_int32("cu_q_lens", cu_q_lens, 1)
    s = int(kv_lens.shape[0])
    if s < 1:
        raise ValueError("kv_lens must have at least one sequence slot")
    if int(page_indices.shape[0]) != s:
        raise ValueError(f"page_indices has {page_indices.shape[0]} rows, kv_lens has {s} slots")
    if int(page_indices.shape[1]) < 1:
        raise ValueError("page_indices must have at least one page per sequence")
    if int(cu_q_lens.shape[0]) != s + 1:
        raise ValueError(f"cu_q_lens must have S + 1 = {s + 1} entries, got {cu_q_lens.shape[0]}")
    if np.dtype(num_seqs.dtype) != np.int32:
        raise ValueError(f"num_seqs must be int32, got {np.dtype(num_seqs.dtype).name}")
    if tuple(num_seqs.shape) not in ((), (1,)):
        raise ValueError(f"num_seqs must be a scalar or shape [1], got {tuple(num_seqs.shape)}")
    if num_tokens < 1:
        raise ValueError("q must have at least one row (T >= 1)")
    return s, int(page_indices.shape[1])


def _check_q_heads(q, hkv, d, pages_name) -> tuple[int, int, int]:
    """q [T, Hq, D] against a cache of hkv KV heads of head dim d: returns (T, Hq, G)."""
    t, hq, dq = (int(x) for x in q.shape)
    if dq != d:
        raise ValueError(f"q head dim {dq} != {pages_name} head dim {d}")
    if hq % hkv:
        raise ValueError(f"q heads Hq={hq} is not a multiple of {pages_name} KV heads Hkv={hkv}")
    g = hq // hkv
    if g not in SUPPORTED_GROUPS:
        raise ValueError(f"q heads per KV head G={g} not supported; supported: {SUPPORTED_GROUPS}")
    return t, hq, g


def check_static_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, soft_cap, sliding_window, k_scales=None, v_scales=None,
                           sinks=None) -> PagedGeometry:
    """All trace-time checks of `paged_attention`; returns the geometry."""
    if len(q.shape) != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if _dtype_name(q) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {_dtype_name(q)}")
    hkv, p, page_size, d = check_static_pages(k_pages, v_pages)
    t, hq, g = _check_q_heads(q, hkv, d, "k_pages")
    check_static_scales(k_pages, k_scales, v_scales)
    check_static_sinks(sinks, hq)
    s, pps = check_static_metadata(kv_lens, page_indices, cu_q_lens, num_seqs, t)
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive number or None, got {sm_scale!r}")
    if soft_cap is not None and not (isinstance(soft_cap, (int, float)) and soft_cap > 0):
        raise ValueError(f"soft_cap must be a positive number or None, got {soft_cap!r}")
    if sliding_window is not None and not (
            isinstance(sliding_window, (int, np.integer)) and not isinstance(sliding_window, bool)
            and sliding_window >= 1):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    return PagedGeometry(t, hq, hkv, g, d, p, page_size, s, pps)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


# `ragged_paged_attention`'s mask_value: masked keys get weight exactly 0 there, jax's result
# when exp(mask_value + logit - row max) underflows in f32, i.e. for any value at most this.
MAX_MASK_VALUE = -1e4


def check_static_ragged(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale,
                        sliding_window, soft_cap, mask_value, k_scale, v_scale,
                        num_kv_pages_per_block, num_queries_per_block,
                        vmem_limit_bytes) -> PagedGeometry:
    """All trace-time checks of `ragged_paged_attention` (jax's interleaved layout)."""
    if len(q.shape) != 3:
        raise ValueError(f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    if _dtype_name(q) not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be one of {SUPPORTED_DTYPES}, got {_dtype_name(q)}")
    if len(kv_pages.shape) != 4:
        raise ValueError(f"kv_pages must be [total_pages, page_size, 2 * Hkv, D], got shape "
                         f"{tuple(kv_pages.shape)}")
    if _dtype_name(kv_pages) not in SUPPORTED_DTYPES:
        raise ValueError(f"kv_pages dtype must be one of {SUPPORTED_DTYPES}, got "
                         f"{_dtype_name(kv_pages)} (quantized caches are not supported)")
    p, page_size, combined, d = (int(x) for x in kv_pages.shape)
    if combined < 2 or combined % 2:
        raise ValueError(f"kv_pages combined heads {combined} must be even (2 * Hkv: K and V "
                         "interleaved per head)")
    hkv = combined // 2
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"kv_pages head dim D={d} not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE) or page_size % 16:
        raise ValueError(f"kv_pages page_size={page_size} not supported: must be a multiple of "
                         f"16 in [{MIN_PAGE_SIZE}, {MAX_PAGE_SIZE}]")
    if p < 1:
        raise ValueError("kv_pages must hold at least one page")
    t, hq, g = _check_q_heads(q, hkv, d, "kv_pages")
    s, pps = check_static_metadata(kv_lens, page_indices, cu_q_lens, num_seqs, t)
    if not (_is_number(sm_scale) and np.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite number, got {sm_scale!r}")
    if sliding_window is not None and not (
            isinstance(sliding_window, (int, np.integer)) and not isinstance(sliding_window, bool)
            and sliding_window > 0):
        raise ValueError(f"sliding_window={sliding_window!r} must be positive (an int) or None")
    if soft_cap is not None:
        if not (_is_number(soft_cap) and np.isfinite(soft_cap)):
            raise ValueError(f"soft_cap must be a finite number or None, got {soft_cap!r}")
        if soft_cap == 0.0:
            raise ValueError(f"soft_cap={soft_cap!r} must not be 0.0")
    if mask_value is not None and not (_is_number(mask_value) and mask_value <= MAX_MASK_VALUE):
        raise ValueError(f"mask_value must be None or a number <= {MAX_MASK_VALUE:g} (masked keys "
                         f"get weight exactly 0), got {mask_value!r}")
    for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
        if x is not None and not (_is_number(x) and np.isfinite(x)):
            raise ValueError(f"{name} must be a finite number or None, got {x!r}")
    if num_kv_pages_per_block is not None and not (
            isinstance(num_kv_pages_per_block, (int, np.integer))
            and 0 < num_kv_pages_per_block <= pps):
        raise ValueError(f"num_kv_pages_per_block={num_kv_pages_per_block!r} must be in range "
                         f"(0, {pps}]")
    if num_queries_per_block is not None and not (
            isinstance(num_queries_per_block, (int, np.integer)) and num_queries_per_block > 0):
        raise ValueError(f"num_queries_per_block={num_queries_per_block!r} must be positive")
    if vmem_limit_bytes is not None and not (
            isinstance(vmem_limit_bytes, (int, np.integer)) and vmem_limit_bytes > 0):
        raise ValueError(f"vmem_limit_bytes={vmem_limit_bytes!r} must be positive")
    return PagedGeometry(t, hq, hkv, g, d, p, page_size, s, pps)


def check_static_write(k_pages, v_pages, k_new, v_new, kv_lens, page_indices, cu_q_lens,
                       num_seqs, k_scales=None, v_scales=None) -> PagedGeometry:
    """All trace-time checks of `write_kv_pages`; returns the geometry (Hq = Hkv, G = 1).
    8-bit pages take bf16 / f32 new rows (quantized on the way in) and need their scales."""
    hkv, p, page_size, d = check_static_pages(k_pages, v_pages)
    quantized = check_static_scales(k_pages, k_scales, v_scales)
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if len(x.shape) != 3 or int(x.shape[1]) != hkv or int(x.shape[2]) != d:
            raise ValueError(f"{name} must be [T, Hkv={hkv}, D={d}], got shape {tuple(x.shape)}")
        if quantized and _dtype_name(x) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES} for a "
                             f"{_dtype_name(k_pages)} cache, got {_dtype_name(x)}")
        if not quantized and _dtype_name(x) != _dtype_name(k_pages):
            raise ValueError(f"{name} dtype {_dtype_name(x)} != page dtype {_dtype_name(k_pages)}")
    if tuple(v_new.shape) != tuple(k_new.shape):
        raise ValueError(f"v_new shape {tuple(v_new.shape)} != k_new shape {tuple(k_new.shape)}")
    t = int(k_new.shape[0])
    s, pps = check_static_metadata(kv_lens, page_indices, cu_q_lens, num_seqs, t)
    return PagedGeometry(t, hkv, hkv, 1, d, p, page_size, s, pps)


def check_paged_attention_inputs(q_or_new_rows, k_pages, kv_lens, page_indices, cu_q_lens,
                                 num_seqs) -> None:
    """Host-side checks of the dynamic facts; raises ValueError describing the first violation.

    q_or_new_rows: q [T, Hq, D] (or k_new [T, Hkv, D]); only its row count T is used.
    Checks: 0 <= num_seqs <= S; cu_q_lens[0] == 0, monotone non-decreasing up to num_seqs,
    cu_q_lens[num_seqs] <= T; for each sequence in use: q_len <= kv_len <= pages_per_seq * page_size
    and every page-table entry it needs (slots < ceil(kv_len / page_size)) in [0, P).
    """
    _check_dynamic(int(q_or_new_rows.shape[0]), int(k_pages.shape[1]), int(k_pages.shape[2]),
                   kv_lens, page_indices, cu_q_lens, num_seqs)


def check_ragged_paged_attention_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                        num_seqs) -> None:
    """`check_paged_attention_inputs` for jax's layout, kv_pages [P, page_size, 2 * Hkv, D]."""
    _check_dynamic(int(q.shape[0]), int(kv_pages.shape[0]), int(kv_pages.shape[1]), kv_lens,
                   page_indices, cu_q_lens, num_seqs)


def _check_dynamic(t, total_pages, page_size, kv_lens, page_indices, cu_q_lens, num_seqs):
    kv_lens = np.asarray(kv_lens)
    page_indices = np.asarray(page_indices)
    cu = np.asarray(cu_q_lens)
    n = int(np.asarray(num_seqs).reshape(-1)[0])
    s, pps = page_indices.shape
    if not 0 <= n <= s:
        raise ValueError(f"num_seqs={n} out of range [0, {s}]")
    if cu[0] != 0:
        raise ValueError(f"cu_q_lens[0] must be 0, got {cu[0]}")
    if np.any(np.diff(cu[: n + 1]) < 0):
        raise ValueError(f"cu_q_lens must be non-decreasing over the sequences in use: {cu[: n + 1]}")
    if cu[n] > t:
        raise ValueError(f"cu_q_lens[num_seqs]={cu[n]} exceeds the {t} rows of q")
    for i in range(n):
        q_len = int(cu[i + 1] - cu[i])
        kv_len = int(kv_lens[i])
        if kv_len < q_len:
            raise ValueError(f"sequence {i}: kv_lens={kv_len} < q_len={q_len}")
        if kv_len > pps * page_size:
            raise ValueError(f"sequence {i}: kv_lens={kv_len} exceeds the page-table capacity "
                             f"{pps} * {page_size}")
        used = page_indices[i, : -(-kv_len // page_size)]
        bad = (used < 0) | (used >= total_pages)
        if np.any(bad):
            j = int(np.argmax(bad))
            raise ValueError(f"sequence {i}: page_indices[{i}, {j}]={used[j]} out of range "
                             f"[0, {total_pages})")
