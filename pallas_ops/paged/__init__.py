"""Ragged paged causal attention (the target model), and `write_kv_pages`.

    api.py          paged_attention: the public wrapper (static checks, block-size choice)
    kernel.py       the pl.pallas_call and its kernel body
    plan.py         the work list (which pages each q block needs) and the VMEM budget
    write.py        write_kv_pages: the page-wise read-modify-write kernel
    xla.py          plain-jnp twins of both (same contract, fast on CPU)
    block_sizes.py  PagedAttentionBlockSizes and the per-generation table
    validation.py   static checks and the host-side `check_paged_attention_inputs`
"""
from pallas_ops.paged.api import paged_attention
from pallas_ops.paged.block_sizes import PagedAttentionBlockSizes
from pallas_ops.paged.validation import check_paged_attention_inputs
from pallas_ops.paged.write import write_kv_pages

__all__ = ["PagedAttentionBlockSizes", "check_paged_attention_inputs", "paged_attention",
           "write_kv_pages"]
