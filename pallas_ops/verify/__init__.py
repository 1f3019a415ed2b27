"""Fused verify/accept (greedy and exact speculative sampling) from the target's logits.

    api.py          verify_accept: the public wrapper (static checks, block-size choice)
    kernel.py       the pl.pallas_call and its kernel body
    filter_kernel.py  top-k / top-p / min-p: the filtered sequences' pass (thresholds, sample)
    filters.py      the filters' parameters and their plain-jnp thresholds
    xla.py          the plain-jnp twin, and the host-side steps the kernel shares with it
    block_sizes.py  VerifyAcceptBlockSizes and the per-generation table
    validation.py   static argument checks
    result.py       VerifyResult
"""
from pallas_ops.verify.api import verify_accept
from pallas_ops.verify.block_sizes import VerifyAcceptBlockSizes
from pallas_ops.verify.result import VerifyResult

__all__ = ["VerifyAcceptBlockSizes", "VerifyResult", "verify_accept"]
