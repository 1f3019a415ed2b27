"""`ragged_paged_attention`: a drop-in for jax's bundled Pallas TPU kernel of the same name.

Same signature, argument names, defaults and cache layout as
`jax.experimental.pallas.ops.tpu.ragged_paged_attention.ragged_paged_attention` (kv_pages
[total_pages, page_size, 2 * Hkv, D], K of KV head h at combined head 2h, V at 2h + 1), so a
project that pages its KV cache for jax's kernel switches by changing one import. The work runs
in our paged attention kernel (`pallas_ops.paged.kernel`), which reads that layout where it lies
(`pallas_ops.paged.layout.INTERLEAVED`): no transpose or copy of the cache.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_ops.chips import CHIPS, current_chip
from pallas_ops.execution import resolve_interpret
from pallas_ops.paged.block_sizes import PagedAttentionBlockSizes, default_block_sizes, resolve
from pallas_ops.paged.call import run_paged_attention
from pallas_ops.paged.layout import INTERLEAVED
from pallas_ops.paged.validation import check_ragged_paged_attention_inputs, check_static_ragged

# jax's default mask value (its kernel adds it to masked logits).
DEFAULT_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# VMEM for the KV block buffers when the block size comes from our table (two slots, and for
# 16-bit caches the block again as 32-bit words): 12 MiB at 1024 keys of 8 bf16 heads, D = 128.
KV_BUFFER_BYTES = 24 * 1024 * 1024


def ragged_block_sizes(*, num_kv_pages_per_block, num_queries_per_block, page_size, group,
                       chip, kv_row_bytes=0) -> PagedAttentionBlockSizes:
    """jax's block-size arguments as ours (`PagedAttentionBlockSizes`).

    - num_kv_pages_per_block (pages per DMA'd compute block) -> kv_tokens = that * page_size;
      None: the generation's table entry (`pallas_ops.paged.block_sizes.TABLE`), lowered to
      whole pages within KV_BUFFER_BYTES when a token's K/V rows (`kv_row_bytes`, the VMEM one
      token of the block takes) are wide.
    - num_queries_per_block -> q_tokens, rounded up to a multiple of 8 / gcd(8, G) (the packed
      q tile's rows, q_tokens * G, fill whole sublanes); None: chosen from the call's shapes.
    - KV heads per grid step are not a jax argument: the interleaved kernel reads whole pages,
      every head; on a megacore chip with a single q block an automatic q block is halved so
      both TensorCores get work (`resolve`).
    Each None is filled independently (jax takes both from its table when either is None).
    """
    if num_kv_pages_per_block is None:
        kv_tokens = default_block_sizes(chip).kv_tokens
        if kv_row_bytes and kv_tokens * kv_row_bytes > KV_BUFFER_BYTES:
            kv_tokens = max(page_size, KV_BUFFER_BYTES // kv_row_bytes // page_size * page_size)
    else:
        kv_tokens = num_kv_pages_per_block * page_size
    q_tokens = num_queries_per_block
    if q_tokens is not None:
        step = 8 // math.gcd(8, group)
        q_tokens = -(-q_tokens // step) * step
    return PagedAttentionBlockSizes(kv_tokens=kv_tokens, q_tokens=q_tokens)


def kv_row_bytes(kv_dtype, num_kv_heads, head_dim) -> int:
    """VMEM one token of a KV block takes: K and V of every head, two slots (+ the 32-bit words
    of a 16-bit block)."""
    item = jnp.dtype(kv_dtype).itemsize
    return (2 + (item == 2)) * 2 * num_kv_heads * head_dim * item


def ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale=1.0, sliding_window=None, soft_cap=None,
                           mask_value=DEFAULT_MASK_VALUE, k_scale=None, v_scale=None,
                           num_kv_pages_per_block=None, num_queries_per_block=None,
                           vmem_limit_bytes=None, chip=None, validate=False, interpret=None):
    """Ragged paged causal attention (GQA) over jax's interleaved KV cache.

    Args (jax's, same names, defaults and meaning):
      q: [T, Hq, D] bf16/f32: all sequences' new tokens, concatenated.
      kv_pages: [P, page_size, 2 * Hkv, D] bf16/f32: K of KV head h at combined head 2h, V at
        2h + 1. Any dtype pairing with q's among bf16/f32; fp8/int caches raise ValueError.
      kv_lens: int32 [S]; page_indices: int32 [S, pages_per_seq]; cu_q_lens: int32 [S + 1];
        num_seqs: int32 [1] (or a scalar): as in jax (slots >= num_seqs are padding).
      sm_scale: multiplies q.K (default 1.0, as jax: not 1/sqrt(D)).
      sliding_window: a query at position p sees keys at positions > p - sliding_window.
      soft_cap: logits -> c * tanh(logits / c) (any nonzero c; the sign does not matter).
      mask_value: jax adds it to masked logits; here masked keys get weight exactly 0, which is
        jax's result for its default and for any value <= -1e4 (-1e4 underflows exp in f32);
        a larger value raises ValueError.
      k_scale, v_scale: K and V are multiplied by them (a dequantisation scale; applied to the
        logits and the output, the same product).
      num_kv_pages_per_block, num_queries_per_block: mapped onto our block sizes, see
        `ragged_block_sizes`. vmem_limit_bytes: the Mosaic VMEM limit (None: our estimate).
    Ours only:
      chip: 'v5e' | 'v5p' | 'v6e' | None (the current TPU): block sizes, VMEM budget, megacore.
      validate: check the dynamic facts on the host first (needs concrete arrays).
      interpret: see `pallas_ops.execution.resolve_interpret` (the TPU interpreter off TPU).
    Returns:
      [T, Hq, D] in q's dtype; rows past cu_q_lens[num_seqs] are zeros.
    """
    if isinstance(num_seqs, int):
        num_seqs = jnp.asarray([num_seqs], jnp.int32)
    geo = check_static_ragged(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, mask_value=mask_value,
        k_scale=k_scale, v_scale=v_scale, num_kv_pages_per_block=num_kv_pages_per_block,
        num_queries_per_block=num_queries_per_block, vmem_limit_bytes=vmem_limit_bytes)
    if chip is not None and chip not in CHIPS:
        raise ValueError(f"chip must be one of {sorted(CHIPS)} or None, got {chip!r}")
    if validate:
        check_ragged_paged_attention_inputs(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                            num_seqs)
    chip = chip if chip is not None else current_chip()
    wanted = ragged_block_sizes(num_kv_pages_per_block=num_kv_pages_per_block,
                                num_queries_per_block=num_queries_per_block,
                                page_size=geo.page_size, group=geo.group, chip=chip,
                                kv_row_bytes=kv_row_bytes(kv_pages.dtype, geo.num_kv_heads,
                                                          geo.head_dim))
    bs = resolve(wanted, chip=chip, num_tokens=geo.num_tokens, max_seqs=geo.max_seqs,
                 num_kv_heads=geo.num_kv_heads, group=geo.group, page_size=geo.page_size,
                 pages_per_seq=geo.pages_per_seq, head_align=geo.num_kv_heads)
    scale = float(sm_scale) * (1.0 if k_scale is None else float(k_scale))
    return run_paged_attention(
        q, (kv_pages,), kv_lens, page_indices, cu_q_lens, num_seqs, layout=INTERLEAVED,
        sm_scale=scale, soft_cap=None if soft_cap is None else abs(float(soft_cap)),
        sliding_window=None if sliding_window is None else int(sliding_window),
        out_scale=None if v_scale is None else float(v_scale), bs=bs, chip=chip,
        vmem_limit=None if vmem_limit_bytes is None else int(vmem_limit_bytes),
        interpret=resolve_interpret(interpret))
