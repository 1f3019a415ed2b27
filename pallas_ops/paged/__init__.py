"""Ragged paged causal attention (the target model), and `write_kv_pages`.

    api.py          paged_attention: the public wrapper (static checks, block-size choice)
    ragged.py       ragged_paged_attention: a drop-in for jax's kernel of that name (its
                    signature and interleaved cache layout), the same kernel
    kernel.py       the kernel bodies (every cache layout share one attention body)
    call.py         the pl.pallas_call: q packing, work list, 8-bit scale layout
    layout.py       the cache layouts (K/V split, 8-bit split with scales, jax's interleaved):
                    how pages are DMA'd and K/V of a head read
    plan.py         the work list (which pages each q block needs) and the VMEM budget
    write.py        write_kv_pages: the page-wise read-modify-write kernel
    xla.py          plain-jnp twins of both (same contract, fast on CPU)
    block_sizes.py  PagedAttentionBlockSizes and the per-generation table
    validation.py   static checks and the host-side `check_paged_attention_inputs`
"""
from pallas_ops.paged.api import paged_attention
from pallas_ops.paged.block_sizes import PagedAttentionBlockSizes
from pallas_ops.paged.ragged import ragged_paged_attention
from pallas_ops.paged.validation import (
    check_paged_attention_inputs,
    check_ragged_paged_attention_inputs,
)
from pallas_ops.paged.write import write_kv_pages

__all__ = ["PagedAttentionBlockSizes", "check_paged_attention_inputs",
           "check_ragged_paged_attention_inputs", "paged_attention", "ragged_paged_attention",
           "write_kv_pages"]
