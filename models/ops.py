"""Backend dispatch: one numerics contract, two implementations.

- ``"pallas"``: the hand-written kernels of `pallas_ops` (compiled by Mosaic on a TPU, run in the
  TPU interpreter elsewhere: correct but slow off TPU).
- ``"xla"``: their plain-jnp twins (`pallas_ops.<kernel>.xla`), fast on CPU.

The model code calls `get_ops(backend).<op>(...)` and never imports a kernel module directly.
Kernel modules are imported lazily so each backend only needs its own modules.
"""
from __future__ import annotations

import dataclasses
import importlib

import jax

BACKENDS = ("pallas", "xla")


@dataclasses.dataclass(frozen=True)
class Ops:
    backend: str
    chip: str | None = None      # pallas only: block sizes / VMEM budget of this TPU generation
                                 # (None = the current TPU, else the kernels' fallback)
    interpret: object = None     # pallas only: the kernels' `interpret=` (None = auto; False to
                                 # compile for a TPU ahead of time from a CPU host)
    model_axis: str | None = None  # inside jax.shard_map: the mesh axis heads, MLP columns and
                                   # the vocabulary are split over (`models.parallel`)

    def _chip(self):
        if self.backend != "pallas":
            return {}
        kw = {"interpret": self.interpret}
        if self.chip:
            kw["chip"] = self.chip
        return kw

    def _mod(self, package):
        suffix = ".xla" if self.backend == "xla" else ""
        return importlib.import_module(f"pallas_ops.{package}{suffix}")

    def _interp(self):
        return {"interpret": self.interpret} if self.backend == "pallas" else {}

    def all_reduce(self, x):
        """The sum over the model axis of every shard's partial x (identity on one device)."""
        return x if self.model_axis is None else jax.lax.psum(x, self.model_axis)

    # A layer cache is (k, v) or, 8-bit, (k, v, k_scales, v_scales): see `models.kv_cache`.

    @staticmethod
    def _scales(cache):
        return dict(k_scales=cache[2], v_scales=cache[3]) if len(cache) == 4 else {}

    def paged_attention(self, q, cache, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                        sliding_window=None):
        """[T, Hq, D] causal attention over a paged layer cache (see
        `pallas_ops.paged_attention`)."""
        return self._mod("paged").paged_attention(
            q, cache[0], cache[1], kv_lens, page_indices, cu_q_lens, num_seqs,
            sliding_window=sliding_window, **self._scales(cache), **self._chip())

    def write_kv_pages(self, cache, k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs):
        """The layer cache with the new tokens written (8-bit: quantized); same tuple layout."""
        return tuple(self._mod("paged").write_kv_pages(
            cache[0], cache[1], k_new, v_new, kv_lens, page_indices, cu_q_lens, num_seqs,
            **self._scales(cache), **self._interp()))

    def block_attention(self, q, k_block, v_block, cache, ctx_lens, *, sliding_window=None):
        """[B, bs, Hq, D] non-causal block attention over a context layer cache (see
        `pallas_ops.block_attention`)."""
        return self._mod("block").block_attention(
            q, k_block, v_block, cache[0], cache[1], ctx_lens, sliding_window=sliding_window,
            **self._scales(cache), **self._chip())

    def append_context(self, cache, k_new, v_new, ctx_lens, n_new):
        """The context layer cache with the new rows appended (8-bit: quantized)."""
        return tuple(self._mod("block").append_context(
            cache[0], cache[1], k_new, v_new, ctx_lens, n_new, **self._scales(cache),
            **self._interp()))

    def verify_accept(self, logits, draft_tokens, *, temperature=None, seed=None, position=None,
                      draft_probs=None, top_k=None, top_p=None, min_p=None,
                      return_logprobs=False):
        """VerifyResult(num_accepted [B], tokens [B, bs][, logprobs [B, bs]]) (see
        `pallas_ops.verify_accept`): draft_probs [B, bs-1, V] (this device's vocabulary shard
        under `model_axis`) or None (one-hot drafts); top_k / top_p / min_p [B] or None (not
        with `model_axis`); return_logprobs: each emitted token's log-probability."""
        return self._mod("verify").verify_accept(
            logits, draft_tokens, temperature=temperature, seed=seed, position=position,
            draft_probs=draft_probs, top_k=top_k, top_p=top_p, min_p=min_p,
            return_logprobs=return_logprobs, vocab_axis_name=self.model_axis, **self._chip())

def get_ops(backend: str, chip: str | None = None, interpret=None, model_axis=None) -> Ops:
    """The ops of `backend`; `chip` / `interpret` are passed to the Pallas kernels (e.g.
    ``get_ops("pallas", chip="v5p", interpret=False)`` to AOT-compile for v5p on a CPU host);
    `model_axis`: the mesh axis of tensor parallelism, when the models run inside shard_map."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return Ops(backend, chip, interpret, model_axis)
