"""Non-causal block attention over a static context cache (the DFlash draft), and `append_context`.

    api.py          block_attention: the public wrapper (static checks, block-size choice)
    kernel.py       the kernel bodies (bf16 / f32 and 8-bit caches)
    call.py         the pl.pallas_call: q packing, VMEM budget, 8-bit scale placement
    append.py       append_context: the tile-wise read-modify-write kernel
    xla.py          plain-jnp twins of both (same contract, fast on CPU)
    block_sizes.py  BlockAttentionBlockSizes and the per-generation table
    validation.py   static checks and the host-side `check_block_attention_inputs`
"""
from pallas_ops.block.api import block_attention
from pallas_ops.block.append import append_context
from pallas_ops.block.block_sizes import BlockAttentionBlockSizes
from pallas_ops.block.validation import check_block_attention_inputs

__all__ = ["BlockAttentionBlockSizes", "append_context", "block_attention",
           "check_block_attention_inputs"]
