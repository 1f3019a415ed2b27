"""`paged_attention`: the public wrapper of the ragged paged attention kernel.

Static checks (shapes, dtypes, head geometry) run here, before any kernel; block sizes come from
the per-generation table (`pallas_ops.paged.block_sizes`); the pallas_call and its body are in
`pallas_ops.paged.kernel`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_ops.chips import CHIPS, current_chip
from pallas_ops.execution import resolve_interpret
from pallas_ops.paged.block_sizes import resolve
from pallas_ops.paged.call import run_paged_attention, scale_page_align
from pallas_ops.paged.layout import QUANT_SPLIT, SPLIT
from pallas_ops.quant import is_quantized
from pallas_ops.paged.validation import check_paged_attention_inputs, check_static_attention


def paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                    sm_scale=None, soft_cap=None, sliding_window=None, k_scales=None,
                    v_scales=None, sinks=None, block_sizes=None, chip=None, validate=False,
                    interpret=None):
    """Ragged paged causal attention (GQA) over a paged KV cache.

    Args:
      q: [T, Hq, D] bf16/f32: the new tokens of all sequences, concatenated in sequence order.
      k_pages, v_pages: [Hkv, P, page_size, D] bf16/f32 (same dtype; f32 stays f32), or an 8-bit
        cache: int8, float8_e4m3fn or float8_e5m2 with `k_scales` / `v_scales` (page_size one of
        16, 32, 64, 128, 256). The kernel moves the 8-bit bytes and widens them in VMEM.
      kv_lens: int32 [S]: keys per sequence, counting its new tokens.
      page_indices: int32 [S, pages_per_seq]: page table (slots past a sequence's need are never
        read and may hold anything).
      cu_q_lens: int32 [S + 1]: sequence s owns q rows cu_q_lens[s] : cu_q_lens[s + 1].
      num_seqs: int32 scalar or [1]: sequences in use (slots >= num_seqs are padding).
      sm_scale: softmax scale, default 1/sqrt(D). soft_cap: logits -> c * tanh(logits / c).
      sliding_window: a query at position p sees keys at positions > p - sliding_window.
      k_scales, v_scales: [Hkv, P, page_size] f32/bf16, 8-bit caches only: the real key / value
        is stored value * scale (one scale per KV head and token; `write_kv_pages` fills them).
      sinks: None or [Hq] f32: one learned logit per q head that joins the softmax denominator
        and attends to nothing (GPT-OSS attention sinks): weights exp(s) / (exp(sink) + sum exp).
      block_sizes: `PagedAttentionBlockSizes` or None (the table entry for `chip`).
      chip: 'v5e' | 'v5p' | 'v6e' | None (the current TPU, else the fallback): picks block sizes
        and the VMEM budget. Only needed when compiling ahead of time for another chip.
      validate: check the dynamic facts on the host first (needs concrete arrays).
      interpret: see `pallas_ops.execution.resolve_interpret`.
    Returns:
      [T, Hq, D] in q's dtype. Query i of sequence s sits at position kv_len - q_len + i and sees
      keys 0..that position (and only the last sliding_window of them); rows past
      cu_q_lens[num_seqs] are zeros.
    """
    if isinstance(num_seqs, int):
        num_seqs = jnp.int32(num_seqs)
    geo = check_static_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                 sm_scale=sm_scale, soft_cap=soft_cap,
                                 sliding_window=sliding_window, k_scales=k_scales,
                                 v_scales=v_scales, sinks=sinks)
    if chip is not None and chip not in CHIPS:
        raise ValueError(f"chip must be one of {sorted(CHIPS)} or None, got {chip!r}")
    if validate:
        check_paged_attention_inputs(q, k_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
    chip = chip if chip is not None else current_chip()
    quantized = is_quantized(k_pages.dtype)
    bs = resolve(block_sizes, chip=chip, num_tokens=geo.num_tokens, max_seqs=geo.max_seqs,
                 num_kv_heads=geo.num_kv_heads, group=geo.group, page_size=geo.page_size,
                 pages_per_seq=geo.pages_per_seq,
                 page_align=scale_page_align(geo.page_size) if quantized else 1,
                 quantized=quantized, head_dim=geo.head_dim)
    scale = 1.0 / math.sqrt(geo.head_dim) if sm_scale is None else float(sm_scale)
    kv = (k_pages, v_pages, k_scales, v_scales) if quantized else (k_pages, v_pages)
    return run_paged_attention(q, kv, kv_lens, page_indices, cu_q_lens, num_seqs,
                               layout=QUANT_SPLIT if quantized else SPLIT, sm_scale=scale,
                               sinks=None if sinks is None else jnp.asarray(sinks, jnp.float32),
                               soft_cap=None if soft_cap is None else float(soft_cap),
                               sliding_window=None if sliding_window is None else int(sliding_window),
                               bs=bs, chip=chip, interpret=resolve_interpret(interpret))
