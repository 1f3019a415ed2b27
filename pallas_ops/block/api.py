"""`block_attention`: the public wrapper of the DFlash draft's block attention kernel.

Static checks run here, before any kernel; block sizes come from `pallas_ops.block.block_sizes`;
the pallas_call is in `pallas_ops.block.call`, its body in `pallas_ops.block.kernel`.
"""
from __future__ import annotations

import math

import jax.numpy as jnp

from pallas_ops.block.block_sizes import BlockAttentionBlockSizes, get_block_sizes
from pallas_ops.block.call import run_block_attention
from pallas_ops.block.validation import (CACHE_ROW_MULTIPLE, check_lengths, check_static,
                                         is_host_value)
from pallas_ops.chips import current_chip
from pallas_ops.execution import resolve_interpret


def block_attention(q, k_block, v_block, k_cache, v_cache, ctx_lens, *, k_scales=None,
                    v_scales=None, sm_scale=None, sliding_window=None, block_sizes=None,
                    interpret=None, validate=False, chip=None):
    """Non-causal block attention of a bs-token block over a static context cache (Pallas TPU).

    Args:
      q:        [B, bs, Hq, D] bf16/f32, block queries (RoPE applied by the caller); 1 <= bs <= 64.
      k_block:  [B, bs, Hkv, D] same dtype, the block's own keys; Hq % Hkv == 0.
      v_block:  [B, bs, Hkv, D] same dtype, the block's own values.
      k_cache:  [B, Hkv, S_max, D] same dtype, static context keys; rows >= ctx_lens[b] unused.
        S_max must be a multiple of 8 (cache rows are DMA'd in whole (8, 128) HBM tiles). Or a
        quantized cache: int8 / float8_e4m3fn / float8_e5m2 (`pallas_ops.quant`), with k_scales;
        then S_max must be a multiple of 32 ((32, 128) HBM tiles of 8-bit arrays).
      v_cache:  [B, Hkv, S_max, D] k_cache's dtype, static context values.
      ctx_lens: [B] int32 in 0..S_max, valid context rows per sequence.
      k_scales, v_scales: [B, Hkv, S_max] f32 or bf16 (both the same), required for (and only
        for) a quantized cache: context key j of KV head h is k_cache[b, h, j] * k_scales[b, h, j]
        (values likewise). Entries at or past ctx_lens[b] are never used (may be NaN). bf16
        scales pack two KV heads per 32-bit word: a grid step's heads then start at an even head
        (kv_heads_per_step rounded up to an even divisor of Hkv; see `pallas_ops.block.kernel`
        on the 512-byte DMA rule).
      sm_scale: softmax scale (default 1/sqrt(D)).
      sliding_window: None or W >= 1: context key j visible to block query i iff
        j > ctx_lens[b] + i - W.
      block_sizes: `BlockAttentionBlockSizes`; None = the table entry for `chip` (default the
        current chip), else the fallback.
      interpret: see `pallas_ops.execution.resolve_interpret`.
      validate: check ctx_lens on the host first (needs concrete values).
      chip: 'v5e' / 'v5p' / 'v6e' for block sizes and VMEM budget when compiling ahead of time.
    Returns:
      [B, bs, Hq, D] in q's dtype (f32 softmax and accumulation; a quantized cache's values are
      converted to q's dtype, exactly, and its scales applied in f32). D must be 64, 128 or 256.
    """
    B, bs, Hq, Hkv, S_max, D = check_static(q, k_block, v_block, k_cache, v_cache, ctx_lens,
                                            k_scales=k_scales, v_scales=v_scales,
                                            sliding_window=sliding_window,
                                            row_multiple=CACHE_ROW_MULTIPLE)
    if validate or is_host_value(ctx_lens):
        check_lengths(S_max, ctx_lens)
    if chip is None:
        chip = current_chip()
    if block_sizes is None:
        block_sizes = get_block_sizes(chip)
    if not isinstance(block_sizes, BlockAttentionBlockSizes):
        raise ValueError(f"block_sizes must be a BlockAttentionBlockSizes, got {block_sizes!r}")
    scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    return run_block_attention(
        q, k_block, v_block, k_cache, v_cache, jnp.asarray(ctx_lens), k_scales, v_scales,
        scale=scale,
        window=None if sliding_window is None else int(sliding_window),
        block_sizes=block_sizes, interpret=resolve_interpret(interpret), chip=chip)
