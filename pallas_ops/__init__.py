"""pallas-dflash kernels: hand-written Pallas TPU kernels for DFlash speculative decoding.

Execution: compiled Mosaic on a TPU backend, the TPU interpreter elsewhere; every kernel takes
``interpret=`` (see `pallas_ops.execution`).
"""
from pallas_ops.block_attention import (
    BlockAttentionBlockSizes,
    append_context,
    block_attention,
    check_block_attention_inputs,
)
from pallas_ops.execution import default_interpret_params, on_tpu, resolve_interpret
from pallas_ops.paged_attention import (
    PagedAttentionBlockSizes,
    check_paged_attention_inputs,
    paged_attention,
    write_kv_pages,
)
from pallas_ops.verify_accept import VerifyAcceptBlockSizes, VerifyResult, verify_accept

__all__ = ["default_interpret_params", "on_tpu", "resolve_interpret"]
__all__ += ["BlockAttentionBlockSizes", "append_context", "block_attention",
            "check_block_attention_inputs"]
__all__ += ["PagedAttentionBlockSizes", "check_paged_attention_inputs", "paged_attention",
            "write_kv_pages"]
__all__ += ["VerifyAcceptBlockSizes", "VerifyResult", "verify_accept"]
