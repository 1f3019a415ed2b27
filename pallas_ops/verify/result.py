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
    logprobs:     f32 [B, bs] | None   with return_logprobs: the log-probability of each emitted
                                 token under the distribution it was emitted from (sampling rows:
                                 softmax(logits / T) after the filters; greedy rows:
                                 softmax(logits)); 0 where tokens is -1.
    top_logprobs: f32 [B, bs, n] | None  with top_logprobs=n: the n largest log-probabilities of
                                 that distribution per row (-inf past its support), descending;
    top_tokens:   int32 [B, bs, n] | None  their token ids (lowest index first among ties, -1
                                 where the log-probability is -inf).
    """

    num_accepted: Any
    tokens: Any
    logprobs: Any = None
    top_logprobs: Any = None
    top_tokens: Any = None
