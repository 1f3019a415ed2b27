"""Mutation campaign: plant known bugs one at a time and check that the tests notice.

    python -m tests.mutation [--list] [--only ID ...] [--jobs N] [--json PATH] [--timeout S]

Not collected by pytest (no test_ prefix). Each mutant in `MUTANTS` names a file, an exact
snippet of it (which must occur exactly once: a mutant gone stale after an edit fails loudly,
before anything runs), its replacement, a one-line description and the tests that should catch
it. For each mutant the tracked tree (`git ls-files`) is copied to a temporary directory, the one
edit is applied there, and `python -m pytest -q -x -p no:cacheprovider <tests>` runs in that copy
(with a timeout). Result:

    caught    the tests failed
    survived  the tests passed: the bug went unnoticed
    error     pytest could not collect or run them (import/syntax error, no such test)
    timeout   the tests ran past --timeout

Mutants marked `equivalent` (with the reason no output can change) still run, but are left out
of the caught rate. Before the mutants, the same test selections run once on an unmutated copy
(skip with --no-clean-check): a selection that fails without any mutation would make every
mutant look caught.

Why a curated list rather than a mutation tool (mutmut, cosmic-ray): the interpreted kernels
cost seconds to minutes per test run, so a tool's thousands of blind mutants would take days; the
planted bugs here are the ones these kernels actually risk (mask comparisons, off-by-ones in
lengths, positions and page offsets, tie-breaks, scale factors, NaN guards, RNG constants, the
decoder's commit counts), each run against the tests that own that contract.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    original: str           # must occur exactly once in `file`
    replacement: str
    description: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids
    equivalent: str | None = None   # why no output can change (left out of the rate)


def M(id, file, original, replacement, description, *tests, equivalent=None):
    return Mutant(id, file, original, replacement, description, tuple(tests), equivalent)


# Test selections (pytest node ids / files), most specific first so -x stops early.
T_PAGED = "tests/test_paged.py"
T_PAGED_KERNEL = "tests/test_paged.py::test_kernel_matches_reference"
T_PAGED_XLA = "tests/test_paged.py::test_xla_version_matches_reference"
T_PAGED_WRITE = "tests/test_paged.py::test_write_then_attend_matches_reference"
T_REF_PAGED = "tests/test_reference_paged.py"
T_BLOCK = "tests/test_block.py"
T_REF_BLOCK = "tests/test_reference_block.py"
T_VERIFY = "tests/test_verify.py"
T_FILTERS = "tests/test_verify_filters.py"
T_REF_VERIFY = "tests/test_reference_verify.py"
T_DECODE = "tests/test_models_decoding.py"
T_SAMPLING = "tests/test_models_sampling.py"
T_SHARDED = "tests/test_multi_device.py"
T_RAGGED = "tests/test_ragged.py"
T_TRAINED = "tests/test_models_train.py::test_shipped_checkpoints_load_and_decode"

T_PQ = "tests/test_paged_quant.py::test_kernel_matches_reference_over_dequantized_cache"

MUTANTS: list[Mutant] = [
    # ---------------------------------------------------------------- paged attention kernel
    M("paged-causal-diagonal", "pallas_ops/paged/kernel.py",
      "mask = row_ok & (diff <= off)", "mask = row_ok & (diff < off)",
      "causal mask drops the diagonal (a query no longer sees its own key)", T_PAGED),
    M("paged-causal-future", "pallas_ops/paged/kernel.py",
      "off = kv_lens_ref[seq] - q_hi                     # query position",
      "off = kv_lens_ref[seq] - q_hi + 1                 # query position",
      "query positions one too far: each query sees the next (future) key", T_PAGED),
    M("paged-window-edge", "pallas_ops/paged/kernel.py",
      "mask = mask & (diff > off - sliding_window)", "mask = mask & (diff >= off - sliding_window)",
      "sliding window one key too wide", T_PAGED),
    M("paged-row-owner", "pallas_ops/paged/kernel.py",
      "row_ok = (row_tok >= q_lo) & (row_tok < q_hi)", "row_ok = (row_tok >= q_lo) & (row_tok <= q_hi)",
      "a pair also updates the first row of the next sequence", T_PAGED),
    M("paged-v-tail-rows", "pallas_ops/paged/layout.py",
      "jnp.where(row < keep, v, jnp.zeros_like(v))", "jnp.where(row <= keep, v, jnp.zeros_like(v))",
      "V row at kv_len in the last page not zeroed (stale/NaN VMEM reaches p.V)", T_PAGED),
    M("ragged-tail-rows", "pallas_ops/paged/layout.py",
      "jnp.where(row < keep * self.c, kv, jnp.zeros_like(kv))",
      "jnp.where(row < (keep + 1) * self.c, kv, jnp.zeros_like(kv))",
      "interleaved layout: K and V of the token at kv_len in the last page not zeroed "
      "(keeping only row keep * c, K of head 0, would be equivalent: masked scores ignore K)",
      T_RAGGED),
    M("paged-v-past-kv-len", "pallas_ops/paged/kernel.py",
      "valid_end = jnp.minimum(n * page_size, kv_lens_ref[seq] - first * page_size)",
      "valid_end = n * page_size",
      "V rows past kv_len in the last page not zeroed at all", T_PAGED),
    M("paged-v-unloaded-pages", "pallas_ops/paged/kernel.py",
      "start = part + jnp.where(rem > 0, 1, 0)", "start = part + 1",
      "a tail block's first unloaded page is not zeroed when kv_len ends on a page boundary",
      T_PAGED),
    M("paged-soft-cap-dropped", "pallas_ops/paged/kernel.py",
      "s = soft_cap * jnp.tanh(s / soft_cap)", "s = s",
      "soft cap not applied", T_PAGED),
    M("paged-m-safe", "pallas_ops/paged/kernel.py",
      "m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)", "m_safe = m_new",
      "NaN guard of fully masked rows removed (exp(-inf - -inf))", T_PAGED),
    M("paged-l-guard", "pallas_ops/paged/kernel.py",
      "out = acc_ref[h] / jnp.where(l > 0.0, l, 1.0)", "out = acc_ref[h] / l",
      "rows with no key divide 0 by 0 (padding rows NaN instead of zeros)", T_PAGED),
    M("paged-alpha", "pallas_ops/paged/kernel.py",
      "alpha = jnp.exp(m_prev - m_safe)", "alpha = jnp.exp(m_safe - m_prev)",
      "online-softmax rescale inverted", T_PAGED),
    M("paged-sub-tiles", "pallas_ops/paged/kernel.py",
      "lax.fori_loop(lax.div(r_lo, sub), lax.div(r_hi - 1, sub) + 1, one, 0)",
      "lax.fori_loop(lax.div(r_lo, sub), lax.div(r_hi - 1, sub), one, 0)",
      "a pair skips its last 64-row sub-tile", T_PAGED),
    M("paged-block-first-page", "pallas_ops/paged/kernel.py",
      "first = pair_first_page_ref[w] + b * ppb", "first = pair_first_page_ref[w] + b * ppb + 1",
      "KV block page offset one page too far", T_PAGED),
    M("paged-default-scale", "pallas_ops/paged/api.py",
      "scale = 1.0 / math.sqrt(geo.head_dim) if sm_scale is None",
      "scale = 1.0 / geo.head_dim if sm_scale is None",
      "default softmax scale 1/D instead of 1/sqrt(D)", T_PAGED),
    # ---------------------------------------------------------------- paged plan (work list)
    M("plan-last-page", "pallas_ops/paged/plan.py",
      "num_pages = pos_hi // page_size - first_page + 1", "num_pages = pos_hi // page_size - first_page",
      "a pair does not load the page of its last query position", T_PAGED),
    M("plan-window-first-page", "pallas_ops/paged/plan.py",
      "first_key = jnp.maximum(pos_lo - sliding_window + 1, 0)",
      "first_key = jnp.maximum(pos_lo - sliding_window + 2, 0)",
      "first page of the window one key late (skips a page when the edge is on a boundary)",
      T_PAGED),
    M("plan-window-extra-page", "pallas_ops/paged/plan.py",
      "first_key = jnp.maximum(pos_lo - sliding_window + 1, 0)",
      "first_key = jnp.maximum(pos_lo - sliding_window, 0)",
      "window loads a page left of the window when the edge is on a boundary", T_PAGED),
    M("plan-padding-slots", "pallas_ops/paged/plan.py",
      "overlap = ((seq_ids < n) & (q_end > q_start))",
      "overlap = ((seq_ids <= n) & (q_end > q_start))",
      "the first padding slot (>= num_seqs) gets work", T_PAGED),
    # ---------------------------------------------------------------- write_kv_pages kernel
    M("write-row", "pallas_ops/paged/write.py",
      "dst_row = jnp.where(valid, pos % page_size, 0)", "dst_row = jnp.where(valid, (pos + 1) % page_size, 0)",
      "new token written one row down", T_PAGED_WRITE, T_PAGED),
    M("write-page-slot", "pallas_ops/paged/write.py",
      "slot = jnp.clip(pos // page_size, 0, pps - 1)", "slot = jnp.clip((pos - 1) // page_size, 0, pps - 1)",
      "page-table slot of a new token off by one position", T_PAGED_WRITE, T_PAGED),
    M("write-runs-across-blocks", "pallas_ops/paged/write.py",
      "starts = valid & ((t % tb == 0) | (dst_page != prev_page))",
      "starts = valid & (dst_page != prev_page)",
      "a run of one page may straddle two token blocks (reads the wrong block's rows)", T_PAGED),
    M("write-last-run", "pallas_ops/paged/write.py",
      "run_end = jnp.where(r + 1 < n_runs, nxt, n_valid)", "run_end = jnp.where(r < n_runs, nxt, n_valid)",
      "the last run's length is wrong (last page's new tokens not written)", T_PAGED_WRITE, T_PAGED),
    # ---------------------------------------------------------------- paged xla twin
    M("paged-xla-window", "pallas_ops/paged/xla.py",
      "mask = mask & (key_pos[None, :] > p_rows[:, None] - sliding_window)",
      "mask = mask & (key_pos[None, :] >= p_rows[:, None] - sliding_window)",
      "xla twin: sliding window one key too wide", T_PAGED_XLA, T_PAGED),
    M("paged-xla-causal", "pallas_ops/paged/xla.py",
      "mask = (key_pos[None, :] <= p_rows[:, None]) & ok[:, None]",
      "mask = (key_pos[None, :] < p_rows[:, None]) & ok[:, None]",
      "xla twin: causal mask drops the diagonal", T_PAGED_XLA, T_PAGED),
    M("paged-xla-v-nan", "pallas_ops/paged/xla.py",
      "v = jnp.where(jnp.any(mask, axis=0)[None, :, None], v, 0.0)", "v = v",
      "xla twin: masked values not zeroed (NaN * 0 reaches the output)", T_PAGED_XLA, T_PAGED),
    M("paged-xla-row-seq", "pallas_ops/paged/xla.py",
      "seq = jnp.sum((ends[None, :] <= t[:, None]) & in_use[None, :], axis=1)",
      "seq = jnp.sum((ends[None, :] < t[:, None]) & in_use[None, :], axis=1)",
      "xla twin: a sequence's first row is attributed to the previous sequence",
      T_PAGED_XLA, T_PAGED),
    M("paged-xla-row-pos", "pallas_ops/paged/xla.py",
      "row_pos = kv_lens[chunk_seq][:, None] - cu_q_lens[chunk_seq + 1][:, None] + rows",
      "row_pos = kv_lens[chunk_seq][:, None] - cu_q_lens[chunk_seq + 1][:, None] + rows + 1",
      "xla twin: query positions one too far", T_PAGED_XLA, T_PAGED),
    M("paged-xla-write-padding", "pallas_ops/paged/xla.py",
      "page = jnp.where(valid, page_indices[seq, slot], total_pages)",
      "page = page_indices[seq, slot]",
      "xla twin: padding rows past cu_q_lens[num_seqs] are written too", T_PAGED_XLA, T_PAGED),
    M("paged-xla-needed-pages", "pallas_ops/paged/xla.py",
      "needed = (slot[None, :] * ps < kv_lens[:, None])",
      "needed = (slot[None, :] * ps <= kv_lens[:, None])",
      "xla twin keeps the page-table entry of one slot past the need", T_PAGED_XLA, T_PAGED,
      equivalent="the kept entry is clipped into [0, P) and every key of that page is past "
                 "kv_len, so it is masked and its values zeroed before p.V"),
    # ---------------------------------------------------------------- paged reference
    M("ref-paged-causal", "reference/paged.py",
      "mask = k_pos[None, :] <= q_pos[:, None]", "mask = k_pos[None, :] < q_pos[:, None]",
      "reference: causal mask drops the diagonal", T_REF_PAGED),
    M("ref-paged-window", "reference/paged.py",
      "mask &= k_pos[None, :] > q_pos[:, None] - sliding_window",
      "mask &= k_pos[None, :] >= q_pos[:, None] - sliding_window",
      "reference: sliding window one key too wide", T_REF_PAGED),
    M("ref-paged-gqa", "reference/paged.py",
      "kh, vh = k[h // g], v[h // g]", "kh, vh = k[h % hkv], v[h % hkv]",
      "reference: q head h reads KV head h % Hkv (interleaved) instead of h // G", T_REF_PAGED),
    M("ref-paged-scale", "reference/paged.py",
      "scale = 1.0 / np.sqrt(d) if sm_scale is None", "scale = 1.0 / d if sm_scale is None",
      "reference: default scale 1/D", T_REF_PAGED),
    M("ref-paged-soft-cap", "reference/paged.py",
      "logits = soft_cap * np.tanh(logits / soft_cap)", "logits = np.tanh(logits / soft_cap)",
      "reference: soft cap loses its factor c", T_REF_PAGED),
    M("ref-paged-write-pos", "reference/paged.py",
      "pos = int(kv_lens[s]) - (q_end - q_start) + i", "pos = int(kv_lens[s]) - (q_end - q_start) + i + 1",
      "reference write: new token one position too far", T_REF_PAGED),
    # ---------------------------------------------------------------- block attention kernel
    M("block-key-past-ctx", "pallas_ops/block/kernel.py",
      "ok = j < ctx", "ok = j <= ctx",
      "the key at ctx_len (NaN in the tests) is visible", T_BLOCK),
    M("block-window-edge", "pallas_ops/block/kernel.py",
      "ok &= row < (j - ctx + window) * groups", "ok &= row <= (j - ctx + window) * groups",
      "sliding window one context key too wide for the first q head of a row", T_BLOCK),
    M("block-v-not-zeroed", "pallas_ops/block/kernel.py",
      "v = jnp.where(vj < ctx, v, jnp.zeros_like(v))", "v = jnp.where(vj <= ctx, v, jnp.zeros_like(v))",
      "value row at ctx_len not zeroed (NaN * 0 reaches the output)", T_BLOCK),
    M("block-pad-columns", "pallas_ops/block/kernel.py",
      "s = jnp.where(col < bs, s, -jnp.inf)", "s = jnp.where(col <= bs, s, -jnp.inf)",
      "one zero-padded block key is visible", T_BLOCK),
    M("block-window-unmasked-tile", "pallas_ops/block/kernel.py",
      "needs_mask |= t * tile <= ctx + bs - 1 - window",
      "needs_mask |= t * tile < ctx + bs - 1 - window",
      "a tile starting exactly at the window's edge runs the unmasked path", T_BLOCK),
    M("block-straddling-subtiles", "pallas_ops/block/kernel.py",
      "u_end = jax.lax.div(jnp.minimum(ctx - lo, tile) + SUB - 1, SUB)",
      "u_end = jax.lax.div(jnp.minimum(ctx - lo, tile), SUB)",
      "the partial last sub-tile of the tile straddling ctx_len is skipped", T_BLOCK),
    M("block-exp2-rescale", "pallas_ops/block/kernel.py",
      "alpha = jnp.exp2(m_prev - m_new)", "alpha = jnp.exp(m_prev - m_new)",
      "online-softmax rescale in base e while scores are in base 2", T_BLOCK),
    M("block-log2e-scale", "pallas_ops/block/call.py",
      "qs = (q.astype(jnp.float32) * (scale * math.log2(math.e))).astype(dtype)",
      "qs = (q.astype(jnp.float32) * scale).astype(dtype)",
      "q not pre-scaled by log2(e) for the base-2 softmax", T_BLOCK),
    # ---------------------------------------------------------------- append_context kernel
    M("append-row-end", "pallas_ops/block/append.py",
      "ok = (rows >= c) & (rows < c + n)", "ok = (rows >= c) & (rows <= c + n)",
      "append overwrites the cache row just past the new rows", T_BLOCK),
    M("append-chunks", "pallas_ops/block/append.py",
      "n_chunks = jnp.where(n > 0, jax.lax.div(shift + n + ch - 1, ch), 0)",
      "n_chunks = jnp.where(n > 0, jax.lax.div(shift + n, ch), 0)",
      "append skips its last partial chunk", T_BLOCK),
    M("append-roll", "pallas_ops/block/append.py",
      "new = pltpu.roll(win, shift + ch, 0)[:ch]", "new = pltpu.roll(win, shift + ch - 1, 0)[:ch]",
      "append rotates the new rows one row off", T_BLOCK),
    # ---------------------------------------------------------------- block xla twin
    M("block-xla-window", "pallas_ops/block/xla.py",
      "vis = vis & (j[None, None, :] > lo)", "vis = vis & (j[None, None, :] >= lo)",
      "xla twin: sliding window one key too wide", T_BLOCK),
    M("block-xla-ctx-valid", "pallas_ops/block/xla.py",
      "valid = j[None, :] < ctx_lens[:, None]", "valid = j[None, :] <= ctx_lens[:, None]",
      "xla twin: the cache row at ctx_len is read", T_BLOCK),
    M("block-xla-append", "pallas_ops/block/xla.py",
      "pos = jnp.where(t[None, :] < n_new[:, None], ctx_lens[:, None] + t[None, :], S_max)",
      "pos = jnp.where(t[None, :] <= n_new[:, None], ctx_lens[:, None] + t[None, :], S_max)",
      "xla twin: append writes one row more than n_new", T_BLOCK),
    # ---------------------------------------------------------------- block reference
    M("ref-block-window", "reference/block.py",
      "visible[:n] = np.arange(n) > n + i - sliding_window",
      "visible[:n] = np.arange(n) >= n + i - sliding_window",
      "reference: sliding window one key too wide", T_REF_BLOCK),
    M("ref-block-gqa", "reference/block.py",
      "kvh = h // G", "kvh = h % Hkv",
      "reference: q head h reads KV head h % Hkv", T_REF_BLOCK),
    M("ref-block-scale", "reference/block.py",
      "scale = 1.0 / math.sqrt(D) if sm_scale is None", "scale = 1.0 / D if sm_scale is None",
      "reference: default scale 1/D", T_REF_BLOCK),
    # ---------------------------------------------------------------- verify/accept kernel
    M("verify-greedy-tie", "pallas_ops/verify/kernel.py",
      "upd = x > m", "upd = x >= m",
      "greedy ties across chunks go to the highest index", T_VERIFY),
    M("verify-sampling-tie", "pallas_ops/verify/kernel.py",
      "upd = s > m", "upd = s >= m",
      "sampling-score ties across chunks go to the highest index", T_VERIFY),
    M("verify-bonus-token", "pallas_ops/verify/kernel.py",
      "tok_out[...] = jnp.where(fail | (j > a), -1, tok)",
      "tok_out[...] = jnp.where(fail | (j >= a), -1, tok)",
      "the target's token after the accepted drafts is dropped", T_VERIFY),
    M("verify-accept-scan", "pallas_ops/verify/kernel.py",
      "a = jnp.min(jnp.where(match, bs - 1, j), axis=1, keepdims=True)",
      "a = jnp.min(jnp.where(match, bs - 1, j + 1), axis=1, keepdims=True)",
      "accept scan off by one (the first mismatching draft is accepted)", T_VERIFY),
    M("verify-nan-detect", "pallas_ops/verify/kernel.py",
      "bad = nan | (mx == _NEG_INF)", "bad = mx == _NEG_INF",
      "a NaN logit is not detected", T_VERIFY),
    M("verify-tail-mask", "pallas_ops/verify/kernel.py",
      "x = jnp.where(lane < lim - (g0 + c * LANES), x, _NEG_INF)",
      "x = jnp.where(lane <= lim - (g0 + c * LANES), x, _NEG_INF)",
      "the tail tile reads one entry past V", T_VERIFY),
    M("verify-noise-index", "pallas_ops/verify/kernel.py",
      "(m_sc[b], c_sc[b], n0, (lane + base + offset) * mul))",
      "(m_sc[b], c_sc[b], n0, (lane + offset) * mul))",
      "every vocabulary tile reuses the first tile's noise", T_VERIFY),
    M("verify-lse-rescale", "pallas_ops/verify/kernel.py",
      "ls_sc[b] = ls_sc[b] * jnp.exp(m_old - m_safe)", "ls_sc[b] = ls_sc[b]",
      "online log-sum-exp not rescaled when the max grows", T_VERIFY),
    M("verify-lse-max", "pallas_ops/verify/kernel.py",
      "lse_out[...] = lm_sc[...] + jnp.log(ls_sc[...])", "lse_out[...] = jnp.log(ls_sc[...])",
      "log-sum-exp drops its running max", T_VERIFY),
    M("verify-live-blocks", "pallas_ops/verify/kernel.py",
      "last = jnp.maximum(lax.div(ns_ref[0] + (bb - 1), jnp.int32(bb)), 1) - 1",
      "last = jnp.maximum(lax.div(ns_ref[0], jnp.int32(bb)), 1) - 1",
      "the last partly-live block is treated as padding (reads another block's logits)",
      T_VERIFY),
    M("verify-padding-seqs", "pallas_ops/verify/kernel.py",
      "fail = (jnp.max(bad.astype(jnp.int32), axis=1, keepdims=True) > 0) | (seq_id >= ns)",
      "fail = (jnp.max(bad.astype(jnp.int32), axis=1, keepdims=True) > 0) | (seq_id > ns)",
      "sequence num_seqs (padding) gets tokens", T_VERIFY),
    # ---------------------------------------------------------------- verify filters
    M("filters-fast-path-bound", "pallas_ops/verify/filter_kernel.py",
      "ok = jnp.logical_not(on_k) | (tx_k > lam)", "ok = jnp.logical_not(on_k) | (tx_k >= lam)",
      "top-k fast path taken when the threshold equals the lanes' 4th value (ties left out)",
      T_FILTERS),
    M("filters-no-fallback", "pallas_ops/verify/filter_kernel.py",
      "ok = ok | bad\n", "ok = ok | bad | True\n",
      "every row treated as inside the candidates (no fallback)", T_FILTERS),
    M("filters-packed-zero", "pallas_ops/verify/filter_kernel.py",
      "x = jnp.maximum(jnp.where(x == 0.0, _TINY, x), _LOWEST_BF16)",
      "x = jnp.maximum(x, _LOWEST_BF16)",
      "packed bf16 zeros become subnormals (flushed: their indices collide)", T_FILTERS,
      equivalent="only a TPU flushes subnormals in compares; interpreted on a CPU the packed "
                 "zeros compare exactly, so no test here can see it"),
    M("filters-topk-count", "pallas_ops/verify/filter_kernel.py",
      "for v in vals]) >= kf, **kw),", "for v in vals]) > kf, **kw),",
      "top-k keeps k - 1 (the k-th largest dropped)", T_FILTERS),
    M("filters-topp-mass", "pallas_ops/verify/filter_kernel.py",
      "target = p * z\n", "target = p * _rsum(es)\n",
      "top-p alone measured against the candidates' mass, not the row's", T_FILTERS),
    M("filters-not-fetched", "pallas_ops/verify/filter_kernel.py",
      "return src[i], jnp.where(on, g, jnp.where(before, nrg - 1, 0))",
      "return src[i], jnp.where(on, g, 0)",
      "an unfiltered sequence after a filtered one maps to another block (a fetch)",
      T_FILTERS),
    M("filters-ref-order", "reference/verify.py",
      "        keep = y >= tau\n        w = np.exp(y - y.max())",
      "        keep = y >= -np.inf\n        w = np.exp(y - y.max())",
      "reference: top-p over the whole row, not renormalised over the top-k set", T_FILTERS),
    # ---------------------------------------------------------------- verify xla twin / shared
    M("verify-inv-temperature", "pallas_ops/verify/xla.py",
      "inv_t = jnp.where(samp, 1.0 / jnp.where(samp, t, 1.0), 1.0)",
      "inv_t = jnp.where(samp, jnp.where(samp, t, 1.0), 1.0)",
      "logits multiplied by T instead of 1/T", T_VERIFY),
    M("verify-row-position", "pallas_ops/verify/xla.py",
      "rowpos = pos[:, None] + jnp.arange(bs, dtype=jnp.int32)[None, :]",
      "rowpos = pos[:, None] + 1 + jnp.arange(bs, dtype=jnp.int32)[None, :]",
      "row j's noise keyed by position + j + 1", T_VERIFY),
    M("verify-xla-accept-scan", "pallas_ops/verify/xla.py",
      "return _emit(a, jnp.where(j <= a[:, None], idx, -1), bad, valid)",
      "return _emit(a, jnp.where(j < a[:, None], idx, -1), bad, valid)",
      "xla twin: the token after the accepted drafts is dropped", T_VERIFY),
    M("verify-xla-accept-test", "pallas_ops/verify/xla.py",
      "accept = dvalid & (u * q_d < p_d)", "accept = dvalid & (u * q_d <= p_d)",
      "draft_probs accept test <= (accepts a draft with p(d) = q(d) = 0)", T_VERIFY),
    M("verify-xla-residual-bonus", "pallas_ops/verify/xla.py",
      "use_res = (a < bs - 1) & jnp.take_along_axis",
      "use_res = jnp.take_along_axis",
      "all drafts accepted, yet a residual sample replaces the bonus token", T_VERIFY),
    M("verify-xla-all-neg-inf", "pallas_ops/verify/xla.py",
      "return idx, nan | (mx == -jnp.inf), lse", "return idx, nan, lse",
      "row statistics: a row of all -inf logits is not detected", T_VERIFY),
    # ---------------------------------------------------------------- verify on vocabulary shards
    M("sharded-tie-break", "pallas_ops/verify/xla.py",
      "idx = jnp.min(jnp.where(mxs == mx, idxs, _BIG), 0)",
      "idx = jnp.max(jnp.where(mxs == mx, idxs, -1), 0)",
      "shards tied at the row maximum: the highest global index wins", T_SHARDED),
    M("sharded-nan", "pallas_ops/verify/xla.py",
      "nan = jnp.max(nans, 0) > 0", "nan = nans[0] > 0",
      "a NaN on any shard but the first goes unnoticed", T_SHARDED),
    M("sharded-lse", "pallas_ops/verify/xla.py",
      "lse = m_safe + jnp.log(jnp.sum(jnp.exp(lses - m_safe), 0))", "lse = m",
      "the shards' log-sum-exps combined by max instead of log-sum-exp", T_SHARDED),
    M("sharded-noise-offset", "pallas_ops/verify/xla.py",
      "index = jnp.arange(V, dtype=jnp.int32) + offset", "index = jnp.arange(V, dtype=jnp.int32)",
      "xla twin: shards key their noise by the local, not the global, vocabulary index",
      T_SHARDED),
    M("sharded-kernel-offset", "pallas_ops/verify/kernel.py",
      "idx_out[...] = tok + offset", "idx_out[...] = tok",
      "kernel stats: the winner reported as a local, not global, vocabulary index", T_SHARDED),
    M("tp-mlp-no-allreduce", "models/target.py",
      "h = h + ops.all_reduce(layer.mlp(layer.post_attention_layernorm(h)))",
      "h = h + layer.mlp(layer.post_attention_layernorm(h))",
      "tensor parallelism: the target's MLP partial sums are never added across shards",
      T_SHARDED),
    M("tp-argmax-local-index", "models/sampling.py",
      "idx = idx + _vocab_offset(values.shape[-1], vocab_axis)", "idx = idx",
      "vocabulary-sharded argmax: the winner reported as a local index", T_SHARDED),
    M("tp-embed-unmasked", "models/target.py",
      "return ops.all_reduce(jnp.where(mine[..., None], rows, jnp.zeros_like(rows)))",
      "return ops.all_reduce(rows)",
      "vocabulary-sharded embedding: every shard adds a (clipped) row, not only the owner",
      T_SHARDED),
    M("tp-kv-replica-order", "models/parallel.py",
      "k = kernel.reshape(kernel.shape[0], num_kv_heads, 1, head_dim)\n    k = jnp.broadcast_to(k, (kernel.shape[0], num_kv_heads, r, head_dim))",
      "k = kernel.reshape(kernel.shape[0], 1, num_kv_heads, head_dim)\n    k = jnp.broadcast_to(k, (kernel.shape[0], r, num_kv_heads, head_dim))",
      "KV-head replication: copies interleaved, so a device reads another group's KV head",
      T_SHARDED),
    M("dp-pool-shared", "models/page_allocator.py",
      "return self._pools[slot // self.slots_per_part]", "return self._pools[0]",
      "data parallelism: every group allocates from the first group's pool",
      "tests/test_models_config.py::test_page_allocator_parts_have_their_own_pools"),
    M("sharded-draft-range", "pallas_ops/verify/kernel.py",
      "drafts = row_drafts(draft_tokens, vocab_size(V, axis))",
      "drafts = row_drafts(draft_tokens, V)",
      "kernel on shards: drafts beyond the first shard's columns treated as invalid", T_SHARDED),
    M("verify-draft-range", "pallas_ops/verify/xla.py",
      "d = jnp.where((d >= 0) & (d < V), d, -1)", "d = jnp.where((d >= 0) & (d <= V), d, -1)",
      "a draft == V counts as valid", T_VERIFY),
    # ---------------------------------------------------------------- verify reference
    M("ref-verify-accept-test", "reference/verify.py",
      "if u * q[a, d] < p[d]:", "if u * q[a, d] <= p[d]:",
      "reference: accept test <= (accepts a draft with p(d) = q(d) = 0)", T_REF_VERIFY),
    M("ref-verify-tie", "reference/verify.py",
      "return int(np.argmax(score))  # first maximum",
      "return int(len(score) - 1 - np.argmax(score[::-1]))  # first maximum",
      "reference: ties go to the highest index", T_REF_VERIFY),
    M("ref-verify-residual", "reference/verify.py",
      "r = np.maximum(p - q[a], 0.0)", "r = np.maximum(q[a] - p, 0.0)",
      "reference: residual max(0, q - p) instead of max(0, p - q)", T_REF_VERIFY),
    M("ref-verify-nan", "reference/verify.py",
      "if np.isnan(x).any() or (x.max(axis=1) == -np.inf).any():",
      "if (x.max(axis=1) == -np.inf).any():",
      "reference: a NaN logit is not detected", T_REF_VERIFY),
    M("ref-verify-position", "reference/verify.py",
      "g = rng.gumbel(rng.bits(rng.row_key(seed[b], pos[b] + j), index))",
      "g = rng.gumbel(rng.bits(rng.row_key(seed[b], pos[b] + j + 1), index))",
      "reference: row j's noise keyed by position + j + 1", T_REF_VERIFY),
    # ---------------------------------------------------------------- rng (kernel and reference)
    M("rng-position-constant", "pallas_ops/rng.py",
      "POSITION_MUL = 0x9E3779B9", "POSITION_MUL = 0x9E3779B1",
      "RNG position multiplier changed", T_REF_VERIFY, T_VERIFY),
    M("rng-uniform-half-step", "pallas_ops/rng.py",
      "return one_plus - jnp.float32(1.0 - 2.0 ** -24)", "return one_plus - jnp.float32(1.0)",
      "uniform loses its half step (0 becomes possible: log(0))", T_REF_VERIFY, T_VERIFY),
    M("rng-fmix-shift", "pallas_ops/rng.py",
      "h = h ^ _srl(h, 13)", "h = h ^ _srl(h, 15)",
      "murmur3 finaliser's middle shift changed", T_REF_VERIFY, T_VERIFY),
    M("ref-rng-constant", "reference/rng.py",
      "FMIX_M2 = np.uint32(0xC2B2AE35)", "FMIX_M2 = np.uint32(0xC2B2AE37)",
      "reference RNG: second fmix multiplier changed", T_REF_VERIFY),
    M("ref-rng-uniform", "reference/rng.py",
      ".astype(np.float64) + 0.5) * 2.0 ** -23", ".astype(np.float64) + 1.0) * 2.0 ** -23",
      "reference RNG: uniform offset 1 instead of 1/2 (1.0 becomes possible)", T_REF_VERIFY),
    # ---------------------------------------------------------------- decoder
    M("spec-commit-count", "models/decoding/speculative.py",
      "n_new = jnp.where(active, num_acc + 1, 0)", "n_new = jnp.where(active, num_acc, 0)",
      "draft context commits one position short per step", T_DECODE),
    M("spec-block-positions", "models/decoding/speculative.py",
      "pos = lens[:, None] + jnp.arange(bs, dtype=jnp.int32)",
      "pos = lens[:, None] + 1 + jnp.arange(bs, dtype=jnp.int32)",
      "block positions shifted by one (draft RoPE, verify positions, context positions)",
      T_DECODE),
    M("spec-verify-kv-lens", "models/decoding/speculative.py",
      "kv_lens = jnp.where(live, lens[order] + bs, 0)", "kv_lens = jnp.where(live, lens[order] + bs - 1, 0)",
      "verify sees one key less (the block's keys land one position early)", T_DECODE),
    M("spec-host-length", "models/decoding/speculative.py",
      "self.slot_len[s] += a + 1", "self.slot_len[s] += a",
      "committed length moves by a instead of a + 1", T_DECODE),
    M("spec-host-tokens", "models/decoding/speculative.py",
      "[int(t) for t in drafts[s, :a]])", "[int(t) for t in drafts[s, :a + 1]])",
      "the committed token list takes one draft too many", T_DECODE),
    M("spec-draft-rows", "models/decoding/speculative.py",
      "dlogits = target.logits(h[:, 1:])",
      "dlogits = target.logits(h[:, :-1])",
      "drafts read from the hidden states one block position early", T_DECODE, T_TRAINED),
    M("ar-kv-lens", "models/decoding/autoregressive.py",
      "kv_lens = jnp.where(live, lens[order] + 1, 0)", "kv_lens = jnp.where(live, lens[order], 0)",
      "autoregressive step: the new token is not counted in kv_lens", T_DECODE),
    M("ar-sample-position", "models/decoding/autoregressive.py",
      "nxt = sample_tokens(logits, temp, seeds, lens, vocab_axis=ops.model_axis,",
      "nxt = sample_tokens(logits, temp, seeds, lens + 1, vocab_axis=ops.model_axis,",
      "autoregressive sampling keyed by the produced token's position, not the fed one's (the "
      "key verify_accept uses: DFlash would no longer emit the AR samples)",
      T_DECODE, T_SAMPLING),
    M("sample-filters-dropped", "models/sampling.py",
      "y = filters.keep(y, tau.reshape(x.shape[:-1]))", "y = y",
      "sampling (first token, AR steps, sampled drafts) ignores top-k / top-p / min-p",
      T_SAMPLING),
    M("sample-logprob-unnormalised", "models/sampling.py",
      "return tokens, _at(y, tokens, vocab_axis) - _logsumexp(y, vocab_axis)",
      "return tokens, _at(y, tokens, vocab_axis) - jnp.max(y, -1)",
      "sample_tokens' logprobs not normalised (relative to the most likely token)",
      "tests/test_models_sampling.py::test_logprobs_are_the_filtered_tempered_log_softmax"),
    M("draft-probs-unfiltered", "models/sampling.py",
      "probs = jnp.exp(y - _logsumexp(y, vocab_axis)[..., None])",
      "probs = jax.nn.softmax(logits * (1 / jnp.maximum(temperature, 1e-6))[:, None, None], -1)",
      "sampled drafts: q passed to verify_accept is the unfiltered distribution, while the "
      "drafts were drawn from the filtered one",
      "tests/test_models_sampling.py::test_draft_sampling_follows_the_filtered_target_distribution"),
    M("draft-override-keeps-q", "models/decoding/speculative.py",
      "q = jnp.where((ext >= 0)[..., None],", "q = jnp.where((ext >= 0)[..., None] & False,",
      "sampled drafts: an overridden proposal is verified against the draft's q, not a one-hot",
      "tests/test_models_sampling.py::test_draft_sampling_with_overridden_proposals_stays_exact"),
    M("draft-stream-shared", "models/sampling.py",
      "tokens, y = _sample(logits, temperature, seed, rowpos, rng.STREAM_DRAFT, filt, vocab_axis)",
      "tokens, y = _sample(logits, temperature, seed, rowpos, rng.STREAM_GUMBEL, filt, vocab_axis)",
      "sampled drafts reuse the target's Gumbel noise (the residual sample is then correlated "
      "with the rejected draft)",
      "tests/test_models_sampling.py::test_draft_sampling_follows_the_filtered_target_distribution"),
    M("engine-prefill-kv-lens", "models/decoding/engine.py",
      "kv_lens[g, s] = start + n", "kv_lens[g, s] = start + n - 1",
      "prefill chunk kv_lens one short", T_DECODE),
    M("engine-prefill-ctx-offset", "models/decoding/engine.py",
      "row_start[g, local], n_new[g, local], ctx_lens[g, local] = r, n, start",
      "row_start[g, local], n_new[g, local], ctx_lens[g, local] = r, n, start + 1",
      "prefill appends the prompt's draft context one row late", T_DECODE),
    M("engine-pages-needed", "models/decoding/engine.py",
      "need = len(prompts[req]) + max_new_tokens + self.extra_positions",
      "need = len(prompts[req]) + max_new_tokens",
      "pages allocated without room for the verify block past the end", T_DECODE),
    M("engine-free-pages", "models/decoding/engine.py",
      "            self.allocator.free(slot)\n            slot_req[slot] = -1",
      "            slot_req[slot] = -1",
      "a finished slot's pages are never freed", T_DECODE),
    M("allocator-free-leak", "models/page_allocator.py",
      "self._pool(slot).extend(reversed(self._owned[slot]))",
      "self._pool(slot).extend(reversed(self._owned[slot][1:]))",
      "freeing a slot leaks its first page", T_DECODE),
    M("allocator-pages-for", "models/page_allocator.py",
      "return -(-num_tokens // self.page_size)", "return num_tokens // self.page_size",
      "pages for n tokens rounded down", T_DECODE),
    # ---------------------------------------------------------------- 8-bit caches, sinks
    M("paged-quant-no-k-scale", "pallas_ops/paged/kernel.py",
      "                s = s * k_scale", "                s = s * 1.0",
      "8-bit K: the per-key scale never multiplies the scores", T_PQ),
    M("paged-quant-no-v-scale", "pallas_ops/paged/kernel.py",
      "pv_p = p if v_scale is None else p * v_scale", "pv_p = p",
      "8-bit V: the per-key scale never multiplies p", T_PQ),
    M("paged-quant-v-scale-unmasked", "pallas_ops/paged/layout.py",
      "self.vs_buf[slot] = jnp.where((lane >= begin) & (lane < end), vs, 0.0)",
      "self.vs_buf[slot] = jnp.where(lane >= begin, vs, 0.0)",
      "8-bit tail blocks keep the (NaN) V scales past kv_len", T_PQ),
    M("paged-quant-window-unaligned", "pallas_ops/paged/plan.py",
      "first_page = first_key // page_size // page_align * page_align",
      "first_page = first_key // page_size",
      "8-bit blocks start off the 128-key scale granule under a sliding window",
      "tests/test_paged_quant.py::test_8bit_kv_blocks_start_on_scale_granules"),
    M("paged-sink-sum", "pallas_ops/paged/kernel.py",
      "l_ref[...] = jnp.ones(l_ref.shape, jnp.float32)",
      "l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)",
      "the sink's exp(sink - m) left out of the denominator",
      "tests/test_paged_quant.py::test_sinks_limits"),
    M("paged-xla-sink", "pallas_ops/paged/xla.py",
      "denom = denom + jnp.exp(sink - m)", "denom = denom + 0.0 * jnp.exp(sink - m)",
      "xla twin: the sink missing from the denominator",
      "tests/test_paged_quant.py::test_every_cache_dtype_and_sinks_on_a_plain_cache"),
    M("paged-write-scales", "pallas_ops/paged/write.py",
      'k_scales = k_scales.at[:, page, row].set(ksc.T, mode="drop")',
      'k_scales = k_scales.at[:, page, row].set(ksc.T * 2, mode="drop")',
      "write_kv_pages stores the wrong K scales",
      "tests/test_paged_quant.py::test_write_then_attend"),
    M("block-quant-no-k-scale", "pallas_ops/block/kernel.py",
      "tile_scales(slot, h, slice(None))\n                s = s * ks",
      "tile_scales(slot, h, slice(None))\n                s = s * 1.0",
      "8-bit draft context: the K scale never multiplies the full-tile scores",
      "tests/test_block_quant.py::test_kernel_matches_dequantized_reference"),
    M("block-quant-no-v-scale", "pallas_ops/block/kernel.py",
      "        pw = p * v_scale", "        pw = p",
      "8-bit draft context: the V scale never multiplies p",
      "tests/test_block_quant.py::test_kernel_matches_dequantized_reference"),
]


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------

def tracked_files(root: pathlib.Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], check=True,
                         capture_output=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def check_mutants(mutants, root: pathlib.Path) -> None:
    """Every id unique, every original snippet present exactly once: else fail loudly."""
    problems, seen = [], set()
    for m in mutants:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: no file {m.file}")
            continue
        n = path.read_text().count(m.original)
        if n != 1:
            problems.append(f"{m.id}: original snippet occurs {n} times in {m.file} (stale mutant?)")
        if m.original == m.replacement:
            problems.append(f"{m.id}: replacement equals the original")
        if not m.tests:
            problems.append(f"{m.id}: no tests")
    if problems:
        raise SystemExit("stale or broken mutants:\n  " + "\n  ".join(problems))


def copy_tree(root: pathlib.Path, files, dest: pathlib.Path) -> None:
    for rel in files:
        src = root / rel
        if not src.is_file():   # deleted in the work tree but still tracked
            continue
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def run_pytest(tree: pathlib.Path, tests, timeout: float):
    """(status, seconds, output tail) of pytest on `tests` inside `tree`."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PALLAS_DFLASH_NO_SHRINK"] = "1"     # same examples as `make test`, failures not shrunk
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the whole pytest process group, ours only
        out, _ = proc.communicate()
        code = None
    secs = time.perf_counter() - t0
    text = out.decode(errors="replace")
    if code is None:
        status = "timeout"
    elif code == 0:
        status = "passed"
    elif code == 1:
        status = "failed"
    else:                      # 2 interrupted (collection error), 3 internal, 4 usage, 5 none
        status = "error"
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in text.splitlines()
              if line.startswith(("FAILED tests/", "ERROR tests/"))]
    return status, secs, "\n".join(text.strip().splitlines()[-15:]), failed


RESULT = {"failed": "caught", "passed": "survived", "error": "error", "timeout": "timeout"}


def run_mutant(m: Mutant, root, files, timeout, keep=False):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"mutant-{m.id}-"))
    try:
        copy_tree(root, files, tmp)
        path = tmp / m.file
        text = path.read_text()
        assert text.count(m.original) == 1, m.id
        path.write_text(text.replace(m.original, m.replacement, 1))
        status, secs, tail, failed = run_pytest(tmp, m.tests, timeout)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return dict(id=m.id, file=m.file, description=m.description, tests=list(m.tests),
                equivalent=m.equivalent, result=RESULT[status], seconds=round(secs, 1),
                caught_by=failed[0] if failed else "", tail=tail)


def clean_check(mutants, root, files, timeout):
    """The union of the mutants' test selections on an unmutated copy: must pass."""
    tests = []
    for m in mutants:
        tests += [t for t in m.tests if t not in tests]
    # a node id inside a listed file is redundant
    files_listed = {t for t in tests if "::" not in t}
    tests = [t for t in tests if t.split("::")[0] not in files_listed or "::" not in t]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mutant-clean-"))
    try:
        copy_tree(root, files, tmp)
        status, secs, tail, _ = run_pytest(tmp, tests, timeout * 4)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return status, secs, tail, tests


def table(results) -> str:
    rows = ["| id | file | description | result | s | caught by |",
            "|---|---|---|---|---|---|"]
    for r in results:
        res = r["result"] + (" (equivalent)" if r["equivalent"] else "")
        by = r["caught_by"].removeprefix("tests/")
        rows.append(f"| {r['id']} | {r['file']} | {r['description']} | {res} | "
                    f"{r['seconds']:.0f} | {by} |")
    return "\n".join(rows)


def summary(results) -> tuple[str, float]:
    counted = [r for r in results if not r["equivalent"]]
    caught = [r for r in counted if r["result"] == "caught"]
    rate = 100.0 * len(caught) / len(counted) if counted else 100.0
    lines = [f"caught {len(caught)} / {len(counted)} non-equivalent mutants = {rate:.1f}% "
             f"({len(results) - len(counted)} equivalent, left out)"]
    for kind in ("survived", "error", "timeout"):
        bad = [r for r in counted if r["result"] == kind]
        if bad:
            lines.append(f"{kind}: " + ", ".join(r["id"] for r in bad))
    for r in results:
        if r["equivalent"]:
            lines.append(f"equivalent {r['id']} ({r['result']}): {r['equivalent']}")
    return "\n".join(lines), rate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutants")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per mutant")
    ap.add_argument("--json", metavar="PATH", help="save the results as JSON")
    ap.add_argument("--no-clean-check", action="store_true",
                    help="skip the run of the selected tests on an unmutated copy")
    ap.add_argument("--min-rate", type=float, default=95.0,
                    help="exit 1 when the caught rate is below this (percent)")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies (debugging)")
    args = ap.parse_args(argv)

    check_mutants(MUTANTS, ROOT)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.id in args.only]
    if args.list:
        for m in mutants:
            eq = "  [equivalent]" if m.equivalent else ""
            print(f"{m.id:28s} {m.file:36s} {m.description}{eq}\n{'':28s} tests: "
                  f"{' '.join(m.tests)}")
        print(f"{len(mutants)} mutants")
        return 0

    files = tracked_files(ROOT)
    start = time.perf_counter()
    if not args.no_clean_check:
        status, secs, tail, tests = clean_check(mutants, ROOT, files, args.timeout)
        print(f"clean check ({len(tests)} selections, {secs:.0f} s): {status}", flush=True)
        if status != "passed":
            print(tail)
            raise SystemExit("the selected tests do not pass on the unmutated tree")

    results = []

    def report(r):
        by = f" by {r['caught_by']}" if r["caught_by"] else ""
        print(f"[{len(results)}/{len(mutants)}] {r['id']}: {r['result']}{by} "
              f"({r['seconds']:.0f} s)", flush=True)
        if r["result"] in ("error", "timeout"):
            print("    " + r["tail"].replace("\n", "\n    "), flush=True)

    if args.jobs <= 1:
        for m in mutants:
            results.append(run_mutant(m, ROOT, files, args.timeout, args.keep))
            report(results[-1])
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_mutant, m, ROOT, files, args.timeout, args.keep)
                       for m in mutants]
            for f in concurrent.futures.as_completed(futures):
                results.append(f.result())
                report(results[-1])
        order = {m.id: i for i, m in enumerate(mutants)}
        results.sort(key=lambda r: order[r["id"]])

    wall = time.perf_counter() - start
    text, rate = summary(results)
    print()
    print(table(results))
    print()
    print(text)
    print(f"wall time {wall / 60:.1f} min")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(
            dict(results=results, rate=rate, wall_seconds=round(wall, 1)), indent=1))
    return 0 if rate >= args.min_rate else 1


if __name__ == "__main__":
    sys.exit(main())
