"""`VerifyResult`, the result type shared by every verify/accept implementation.

`pallas_ops.verify_accept` (the Pallas kernel), `pallas_ops.verify.xla.verify_accept`
(plain jnp) and `reference.verify.verify_accept` (NumPy float64) all return it. Kept free of
jax imports so the NumPy reference can use it on its own.
"""
from __future__ import annotations

from typing import Any, NamedTuple


class VerifyResult(NamedTuple):
    """Outcome of verifying one block per sequence.

    num_accepted: int32 [B]      a = number of drafts accepted (0 .. bs-1).
    tokens:       int32 [B, bs]  d_1..d_a, then the target's token at position a (the correction,
                                 or the bonus when a = bs-1), then -1. Padding rows and rows whose
                                 logits are invalid (NaN, or a position with every logit -inf):
                                 num_accepted 0 and tokens all -1.
    """

    num_accepted: Any
    tokens: Any
