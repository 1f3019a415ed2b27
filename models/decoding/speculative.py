"""DFlash speculative decoding: draft a block in one pass, verify it with the target."""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import check_draft_fits_target
from jax.sharding import PartitionSpec as P

from models import parallel
from models.decoding.engine import Engine
from models.sampling import argmax_tokens, draft_sample, one_hot
from models.draft import DraftModel
from models.kv_cache import make_context_cache
from pallas_ops.block.validation import QUANT_CACHE_ROW_MULTIPLE
from models.target import TargetModel


# SpeculativeDecoder's `draft_sampling` default. Measured on the demo pair (bench/assets) at
# T = 0.7, batch 16, block 16, 200 held-out prompts (`python -m bench.e2e --temperature 0.7
# --block-sizes 16 --draft-sampling on|off`): tau 2.30 with sampled drafts against 2.17 with greedy
# drafts (--seed 2, other prompts: 2.34 against 2.24).
DRAFT_SAMPLING_DEFAULT = True


class SpeculativeDecoder(Engine):
    """DFlash speculative decoding: draft a block in one pass, verify it with the target.

    block_size defaults to the draft config's (the size it was trained for; a different one runs
    but drafts worse). max_seq_len bounds prompt + max_new_tokens; the caches hold block_size
    positions more (the verify block is written past the committed length).

    `kv_cache_dtype`: None (caches in the model dtype) or int8 / float8_e4m3fn / float8_e5m2:
    ONE option for both halves of the dual cache, the target's KV pages and the draft's context
    cache (8-bit values, an f32 scale per KV head and token; `models.kv_cache`). Verification
    stays exact with respect to the target reading that cache: greedy DFlash output equals greedy
    autoregressive output over the same cache dtype whenever both write the same K/V bits. They
    may not: a token's K/V computed inside a verify block and in a one-token decode step differ
    in the last float bits (other reduction shapes), which an 8-bit rounding can turn into a
    different stored value (0 to 2 of 200 demo prompts diverge; f32 / bf16 caches absorb it).

    `proposal_override` (tests, experiments): a callable (request index, tokens generated so
    far for it, bs - 1) -> int array [bs - 1] or None, whose entries >= 0 replace the draft
    model's proposals for that sequence (the draft model still runs and keeps its context, so its
    state can be checked). See `models.testing`.

    `draft_sampling` (sampling sequences, T > 0; default True, the better tau on the demo pair,
    see DRAFT_SAMPLING_DEFAULT): False drafts greedily (the argmax of the
    draft's logits, verified as one-hot proposals: then speculative sampling emits exactly the
    tokens autoregressive sampling emits for the same seeds); True samples each draft from the
    draft model's own tempered distribution, with the same filters as the target's (top-k /
    top-p / min-p), on a noise stream of its own (`pallas_ops.rng.STREAM_DRAFT`), and verifies
    with that distribution as `draft_probs` (full speculative sampling: accept with probability
    min(1, p/q), residual max(0, p - q)): exact too, but other tokens than autoregressive
    sampling's for the same seeds. Proposals from `proposal_override` are verified as one-hot
    proposals either way. Greedy sequences (T = 0) always draft greedily.

    The decoder holds the parameter arrays the models had when it was built: after changing the
    weights, call `sync_weights()`.

    `mesh`: a `jax.sharding.Mesh` with axes "data" and "model" (either of size 1) to run over
    several devices (`models.parallel`): heads, MLP columns and the vocabulary split over
    "model" (the three kernels run per shard inside `jax.shard_map`, `verify_accept` on its
    vocabulary shard), the batch over "data" (each group of max_batch / d slots with its own page
    pool and draft-cache rows). Same tokens as on one device. ValueError, naming the numbers, for
    head counts, vocabulary or batch the mesh does not divide.

    `abstract=True` (ahead-of-time compiles, `models.aot`): the models may be abstract
    (`models.aot.abstract_models`); weights and caches stay `jax.ShapeDtypeStruct`s carrying
    their shardings, nothing is allocated, and `generate` cannot run.
    """

    has_draft = True

    def __init__(self, target: TargetModel, draft: DraftModel, *, max_batch: int,
                 max_seq_len: int, page_size: int = 16, backend: str = "xla",
                 prefill_chunk: int = 256, num_pages: int | None = None, poison: bool = False,
                 block_size: int | None = None, proposal_override: Callable | None = None,
                 kv_cache_dtype=None, mesh=None, abstract: bool = False,
                 draft_sampling: bool = DRAFT_SAMPLING_DEFAULT):
        if not isinstance(draft, DraftModel):
            raise TypeError(f"draft must be a DraftModel, got {type(draft).__name__}")
        check_draft_fits_target(draft.config, target.config)
        if draft.dtype != target.dtype:
            raise ValueError(f"draft dtype {draft.dtype} != target dtype {target.dtype}")
        self.block_size = draft.config.block_size if block_size is None else block_size
        if not isinstance(self.block_size, int) or not 2 <= self.block_size <= 64:
            raise ValueError(f"block_size must be an int in [2, 64], got {self.block_size!r}")
        self.extra_positions = self.block_size
        self.feature_layers = tuple(draft.config.target_layer_ids)
        self._draft_config = draft.config
        super().__init__(target, max_batch=max_batch, max_seq_len=max_seq_len,
                         page_size=page_size, backend=backend, prefill_chunk=prefill_chunk,
                         num_pages=num_pages, poison=poison, kv_cache_dtype=kv_cache_dtype,
                         mesh=mesh, abstract=abstract)
        self.draft = draft
        self._gd, self._sd = nnx.split(draft)
        self._sd, self._sd_spec = self._place_weights(self._sd, draft.config, "draft")
        d = draft.config
        # capacity: every committed position plus one block; a multiple of 16 rows (the Pallas
        # kernels move cache rows in whole (8|16, 128) HBM tiles)
        rows = QUANT_CACHE_ROW_MULTIPLE if self.kv_cache_dtype else 16   # 8-bit: (32, 128) tiles
        self.max_ctx = -(-(max_seq_len + self.block_size) // rows) * rows
        # kv_cache_dtype: one option for both caches (the target's pages and this context cache)
        self.draft_cache = self._make(lambda: make_context_cache(
            d.num_layers, max_batch, self._kv_heads("draft"), self.max_ctx, d.head_dim,
            draft.dtype, float("nan") if poison else 0.0, kv_cache_dtype=self.kv_cache_dtype))
        if self.layout:
            self.draft_cache = parallel.place(self.draft_cache,
                                              parallel.context_cache_spec(self.draft_cache),
                                              self.layout)
        self.proposal_override = proposal_override
        if not isinstance(draft_sampling, (bool, np.bool_)):
            raise ValueError(f"draft_sampling must be a bool, got {draft_sampling!r}")
        self.draft_sampling = bool(draft_sampling)

    def _step_fn(self, greedy: bool, override: bool, filtered: bool = False,
                 logprobs: bool = False, draft_sampling: bool = False):
        """The jitted speculative step. Static variants: greedy (every sequence T = 0: no
        sampling), override (proposal_override), filtered (top-k / top-p / min-p on), logprobs,
        draft_sampling (drafts sampled from the draft's distribution, passed as draft_probs)."""
        gt, gd, ops = self._gt, self._gd, self.ops
        bs = self.block_size
        mask_id = self.draft.config.mask_token_id
        feature_layers = self.feature_layers

        def step(st, tcache, sd, dcache, last, lens, active, order, num_seqs, page_idx, temp,
                 seeds, ext, filt):
            # per data group (one group on one device): B rows of its slots
            B = last.shape[0]
            num_seqs = num_seqs[0]
            target = nnx.merge(gt, st)
            draft = nnx.merge(gd, sd)
            # 1. draft: [last, MASK...] at positions [L, L+bs), context = positions 0..L-1
            block = jnp.concatenate(
                [last[:, None], jnp.full((B, bs - 1), mask_id, jnp.int32)], axis=1)
            pos = lens[:, None] + jnp.arange(bs, dtype=jnp.int32)
            h = draft(target.embed(block, ops), pos, dcache, lens, ops=ops)
            dlogits = target.logits(h[:, 1:])                               # [B, bs-1, V]
            fkw = dict(zip(("top_k", "top_p", "min_p"), filt)) if filtered else {}
            q = None
            if draft_sampling:   # q: the distribution each draft was sampled from
                drafts, q = draft_sample(dlogits, temp, seeds, lens, vocab_axis=ops.model_axis,
                                         **fkw)
            else:
                drafts = argmax_tokens(dlogits, ops.model_axis)
            if override:
                drafts = jnp.where(ext >= 0, ext, drafts)
                if q is not None:   # an override is a deterministic proposal: q one-hot
                    q = jnp.where((ext >= 0)[..., None],
                                  one_hot(ext, dlogits.shape[-1], ops.model_axis), q)
            # 2. verify: target on the bs block tokens of every live sequence (live first)
            vtok = jnp.concatenate([last[:, None], drafts], axis=1)
            live = jnp.arange(B) < num_seqs
            kv_lens = jnp.where(live, lens[order] + bs, 0)
            cu = (jnp.minimum(jnp.arange(B + 1), num_seqs) * bs).astype(jnp.int32)
            hv, feats, tcache = target.forward(vtok[order].reshape(-1), pos[order].reshape(-1),
                                               tcache, kv_lens, page_idx, cu, num_seqs, ops=ops,
                                               feature_layers=feature_layers)
            inv = jnp.argsort(order)
            hv = hv.reshape(B, bs, -1)[inv]
            feats = feats.reshape(B, bs, -1)[inv]
            logits = target.logits(hv)                                       # [B, bs, V] f32
            # 3. accept
            if greedy:
                res = ops.verify_accept(logits, drafts, return_logprobs=logprobs)
            else:
                res = ops.verify_accept(logits, drafts, temperature=temp, seed=seeds,
                                        position=lens, draft_probs=q, return_logprobs=logprobs,
                                        **fkw)
            lp = res.logprobs if logprobs else jnp.zeros(res.tokens.shape, jnp.float32)
            num_acc = res.num_accepted.astype(jnp.int32)
            # 4. commit: exactly the accepted positions' features join the draft context
            n_new = jnp.where(active, num_acc + 1, 0).astype(jnp.int32)
            dcache = draft.append_context(feats, pos, dcache, lens, n_new, ops=ops)
            return num_acc, res.tokens, lp, drafts, tcache, dcache
        if not self.layout:
            return step
        st, tc, sd, dc = self._specs(True)
        d = P("data")
        return self._sharded(step, (st, tc, sd, dc) + (d,) * 10, (d, d, d, d, tc, dc))

    def _decode_step(self, active, last, params, slot_req, out):
        B, bs = self.max_batch, self.block_size
        is_live = np.isin(np.arange(B), active)
        order, slots, num_seqs = self._group_order(active)
        lens = np.where(is_live, self.slot_len, 0).astype(np.int32)
        sp = params.per_slot(slot_req)
        override = self.proposal_override is not None
        ext = np.full((B, bs - 1), -1, np.int32)
        if override:
            for s in active:
                prop = self.proposal_override(slot_req[s], list(out[slot_req[s]]), bs - 1)
                if prop is not None:
                    ext[s] = np.asarray(prop, np.int32)[:bs - 1]
        # static variants (one compiled step each); the values are traced arrays
        greedy = params.greedy
        filtered = params.filtered
        logprobs = params.logprobs
        sampled_drafts = self.draft_sampling and not greedy
        variant = (greedy, override, filtered, logprobs, sampled_drafts)
        key = (self._gt, self._gd, B, bs, self.draft.config.mask_token_id, self.feature_layers,
               self.backend) + variant
        fn = self._jit("spec_step", key, lambda: self._step_fn(*variant), donate=(1, 3),
                       variant=variant)
        num_acc, tokens, lp, drafts, self.target_cache, self.draft_cache = fn(
            self._st, self.target_cache, self._sd, self.draft_cache, last.astype(np.int32), lens,
            is_live, order, num_seqs, self.allocator.page_table[slots], sp["temp"], sp["seeds"],
            ext, (sp["top_k"], sp["top_p"], sp["min_p"]))
        num_acc, tokens, drafts = np.asarray(num_acc), np.asarray(tokens), np.asarray(drafts)
        lp = np.asarray(lp)
        result = {}
        for s in active:
            a = int(num_acc[s])
            if tokens[s, a] < 0:
                raise FloatingPointError(f"verify/accept rejected slot {s}'s target logits "
                                         f"(NaN or all -inf) at position {lens[s]}")
            self.slot_tokens[s].extend([int(last[s])] + [int(t) for t in drafts[s, :a]])
            self.slot_len[s] += a + 1
            result[s] = ([int(t) for t in tokens[s, :a + 1]],
                         [float(x) for x in lp[s, :a + 1]] if logprobs else None)
        return result
