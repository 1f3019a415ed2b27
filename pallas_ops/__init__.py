"""pallas-dflash kernels: hand-written Pallas TPU kernels for DFlash speculative decoding.

Execution: compiled Mosaic on a TPU backend, the TPU interpreter elsewhere; every kernel takes
``interpret=`` (see `pallas_ops.execution`). One package per kernel, the same files in each:

    pallas_ops/paged/    paged_attention, write_kv_pages (the target model);
                         ragged_paged_attention (a drop-in for jax's, its cache layout)
    pallas_ops/block/    block_attention, append_context (the DFlash draft)
    pallas_ops/verify/   verify_accept (greedy and speculative sampling from logits)
    execution.py chips.py aot.py rng.py   shared by every kernel

This module only re-exports the public names; package names never equal a function name.
"""
from pallas_ops.block import (
    BlockAttentionBlockSizes,
    append_context,
    block_attention,
    check_block_attention_inputs,
)
from pallas_ops.execution import default_interpret_params, on_tpu, resolve_interpret
from pallas_ops.paged import (
    PagedAttentionBlockSizes,
    check_paged_attention_inputs,
    check_ragged_paged_attention_inputs,
    paged_attention,
    ragged_paged_attention,
    write_kv_pages,
)
from pallas_ops.verify import VerifyAcceptBlockSizes, VerifyResult, verify_accept

__all__ = ["default_interpret_params", "on_tpu", "resolve_interpret"]
__all__ += ["BlockAttentionBlockSizes", "append_context", "block_attention",
            "check_block_attention_inputs"]
__all__ += ["PagedAttentionBlockSizes", "check_paged_attention_inputs",
            "check_ragged_paged_attention_inputs", "paged_attention", "ragged_paged_attention",
            "write_kv_pages"]
__all__ += ["VerifyAcceptBlockSizes", "VerifyResult", "verify_accept"]
