"""`verify_accept`: the public wrapper of the fused verify/accept kernel.

Static checks run here (`pallas_ops.verify.validation`), before any kernel; block sizes come from
`pallas_ops.verify.block_sizes`; the pallas_call and its body are in `pallas_ops.verify.kernel`.
"""
from __future__ import annotations

import jax.numpy as jnp

from pallas_ops.chips import current_chip
from pallas_ops.execution import resolve_interpret
from pallas_ops.verify.block_sizes import VerifyAcceptBlockSizes, default_block_sizes
from pallas_ops.verify.kernel import run_verify_accept, verify_call
from pallas_ops.verify.result import VerifyResult
from pallas_ops.verify.validation import check_args
from pallas_ops.verify.xla import filter_args


def verify_accept(logits, draft_tokens, *, temperature=None, seed=None, position=None,
                  draft_probs=None, num_seqs=None, top_k=None, top_p=None, min_p=None,
                  return_logprobs=False, top_logprobs=0, block_sizes=None, interpret=None,
                  chip=None, vocab_axis_name=None) -> VerifyResult:
    """Verify a block of drafts per sequence against the target logits, in one kernel.

    Args:
      logits: f32 or bf16 [B, bs, V]; row j scores the token that follows block token j.
      draft_tokens: int32 [B, bs-1], drafts d_1..d_{bs-1}; -1 (or anything outside [0, V)) is
        padding: rejected, never used as an index.
      temperature: f32 [B] or None (all greedy). T <= 0 (or NaN) means greedy for that row.
      seed: int32 [B], per-sequence seed; required when temperature is given.
      position: int32 [B] or None (0): absolute position of block token 0; row j's noise is keyed
        by (seed, position + j), so results do not depend on batch order or padding.
      draft_probs: [B, bs-1, V] float draft distribution q, or None (one-hot drafts).
      num_seqs: int or int32 scalar; sequences >= num_seqs are padding (never read).
      top_k: int32 [B] or None; k > 0 keeps the k largest logits of a sampling row (ties at the
        k-th value kept), 0 = off.
      top_p: f32 [B] in (0, 1] or None; keeps the smallest set of the largest probabilities (of
        what top-k kept, renormalised) whose sum reaches p (ties at the boundary kept), 1 = off.
      min_p: f32 [B] in [0, 1) or None; keeps tokens with probability >= min_p * the largest,
        0 = off. The filters apply to softmax(logits / T) of sampling rows, in this order, then
        renormalise; greedy rows ignore them. A sequence with a filter set goes through
        `filter_kernel` first (one read: thresholds and, mostly, the sample from per-lane
        candidates); rows whose kept set leaves the candidates are sampled above their
        threshold by the sampling kernel (a second read). The others stay single-pass. Values
        are checked when concrete (not traced).
      return_logprobs: also return `VerifyResult.logprobs` f32 [B, bs]: each emitted token's
        log-probability under the distribution it was emitted from (sampling rows: the tempered,
        filtered target distribution; greedy rows: softmax(logits)), 0 where tokens is -1. From
        the same pass (an online log-sum-exp; +1 exp per logit).
      top_logprobs: int in [0, 20]: with return_logprobs, also the n largest log-probabilities of
        that distribution per row and their ids (`VerifyResult.top_logprobs`, `.top_tokens`);
        computed by lax.top_k after the kernel (one more read of the logits).
      block_sizes: `VerifyAcceptBlockSizes` or None (the table for `chip` / the current chip).
      interpret: see `pallas_ops.execution.resolve_interpret`.
      chip: 'v5e' | 'v5p' | 'v6e' | None: block-size table and VMEM budget (None: current chip).
      vocab_axis_name: None, or the name of a mesh axis the vocabulary is split over (call inside
        `jax.shard_map`): logits [B, bs, V / n] and draft_probs [B, bs-1, V / n] are then this
        device's contiguous shard (device k holds columns k * V / n ..), draft tokens and the
        result are global and replicated. Only per-row partials cross the axis (greedy max and
        argmax, the Gumbel-max winner and its score, the log-sum-exp for draft_probs); the noise
        is keyed by the global index, so the result equals the unsharded call's for the same
        seeds (up to the float rounding of a sharded log-sum-exp on the draft_probs path).

    Returns:
      VerifyResult(num_accepted int32 [B], tokens int32 [B, bs][, logprobs, top_logprobs,
      top_tokens]): tokens = d_1..d_a, then the
      target's token at position a, then -1. Padding sequences, and sequences whose logits hold a
      NaN or a row of all -inf: num_accepted 0 and tokens all -1 (see `reference/verify.py`
      for the exact semantics of every case).
    """
    B, bs, V = check_args(logits, draft_tokens, temperature, seed, position, draft_probs,
                          num_seqs, top_k=top_k, top_p=top_p, min_p=min_p,
                          return_logprobs=return_logprobs, top_logprobs=top_logprobs,
                          vocab_axis_name=vocab_axis_name)
    if chip is None:
        chip = current_chip()
    itemsize = jnp.dtype(logits.dtype).itemsize
    if block_sizes is None:
        block_sizes = default_block_sizes(B, bs, V, itemsize, chip)
    if not isinstance(block_sizes, VerifyAcceptBlockSizes):
        raise ValueError(f"block_sizes must be a VerifyAcceptBlockSizes, got {block_sizes!r}")
    if B % block_sizes.seqs_per_block:
        raise ValueError(f"block_sizes.seqs_per_block={block_sizes.seqs_per_block} must divide "
                         f"B={B}")
    interpret = resolve_interpret(interpret)
    num_seqs = jnp.asarray(B if num_seqs is None else num_seqs, jnp.int32).reshape(())
    filt = filter_args(B, temperature, top_k, top_p, min_p)
    opts = dict(bsz=block_sizes, interpret=interpret, chip=chip, logprobs=bool(return_logprobs),
                n_top=int(top_logprobs))
    if vocab_axis_name is not None:   # inside shard_map: the collectives take the caller's trace
        return verify_call(logits, draft_tokens, temperature, seed, position, draft_probs,
                           num_seqs, filt, axis=vocab_axis_name, **opts)
    return run_verify_accept(logits, draft_tokens, temperature, seed, position, draft_probs,
                             num_seqs, filt, **opts)
