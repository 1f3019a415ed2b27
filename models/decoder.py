"""The DFlash speculative decoder and the plain autoregressive baseline.

Both run on the same paged target KV cache and the same kernels (`backend="pallas"` or `"xla"`,
see `models.ops`). Jitted step functions with fixed shapes:

- prefill: a ragged batch of prompt chunks (total tokens padded to a power of two, so only
  O(log prefill_chunk) shapes ever trace); returns the first generated token of each sequence and,
  for the speculative decoder, appends the prompt's target features to the draft's context cache.
- speculative step (one per round, all slots at once): draft the block -> verify it with the
  target (bs tokens per sequence at positions [L, L+bs)) -> `verify_accept` -> commit: each
  sequence's length L moves by its own a+1 and exactly the accepted positions' features are
  appended to the draft context (the draft never sees phantom tokens; RoPE offsets follow L).
- autoregressive step: one token per sequence.

Host state per slot: the committed length L (target KV and draft context both hold positions
0..L-1), the last emitted token (fed at position L next), pages (`PageAllocator`). Sequences
finish independently (EOS or max_new_tokens); their pages are freed and the slot can take a new
prompt.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import sys
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import check_draft_fits_target
from models.draft import DraftModel
from models.kv_cache import make_context_cache, make_paged_cache
from models.ops import get_ops
from models.page_allocator import PageAllocator
from models.sampling import sample_tokens
from models.target import TargetModel

UNUSED_PAGE = 2**30   # page-table filler when poison=True: a stray read of it fails loudly
TRACE_COUNTS: collections.Counter = collections.Counter()
_JIT_CACHE: dict = {}


@dataclasses.dataclass
class GenerationOutput:
    """Per prompt (in input order): generated tokens (prompt excluded, EOS included when hit),
    acceptance lengths of every speculative step (tau = accepted drafts + 1; empty for
    autoregressive decoding) and why it stopped ("eos" or "length")."""
    tokens: list[list[int]]
    acceptance_lengths: list[list[int]]
    finish_reasons: list[str]
    num_steps: int = 0          # decode steps (device calls) after prefill
    decode_seconds: float = 0.0

    @property
    def mean_acceptance(self) -> float:
        taus = [t for seq in self.acceptance_lengths for t in seq]
        return float(np.mean(taus)) if taus else float("nan")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class _Engine:
    """What the speculative and the autoregressive decoders share: target, pages, prefill."""

    extra_positions = 1      # positions written past L in one step

    def __init__(self, target: TargetModel, *, max_batch: int, max_seq_len: int,
                 page_size: int = 16, backend: str = "xla", prefill_chunk: int = 256,
                 num_pages: int | None = None, poison: bool = False):
        if not isinstance(target, TargetModel):
            raise TypeError(f"target must be a TargetModel, got {type(target).__name__}")
        for name, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                        ("page_size", page_size), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
        self.target = target
        self.cfg = target.config
        self.ops = get_ops(backend)
        self.backend = backend
        self.max_batch, self.max_seq_len, self.page_size = max_batch, max_seq_len, page_size
        self.prefill_chunk = prefill_chunk
        self.poison = poison
        self.pages_per_seq = -(-(max_seq_len + self.extra_positions) // page_size)
        self.num_pages = num_pages if num_pages is not None else max_batch * self.pages_per_seq
        self.allocator = PageAllocator(self.num_pages, page_size, max_batch, self.pages_per_seq,
                                       unused_index=UNUSED_PAGE if poison else 0)
        fill = float("nan") if poison else 0.0
        c = self.cfg
        self.target_cache = make_paged_cache(c.num_layers, c.num_kv_heads, self.num_pages,
                                             page_size, c.head_dim, target.dtype, fill)
        self._gt, self._st = nnx.split(target)
        # host state per slot
        self.slot_len = np.zeros(max_batch, np.int64)          # committed length L
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens at 0..L-1

    feature_layers: tuple[int, ...] = ()   # target layers whose outputs the draft reads

    # -- validation ------------------------------------------------------------------------------
    def _check_request(self, prompts, max_new_tokens, temperature, queue):
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
            prompts = [prompts]
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) \
                or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if len(prompts) > self.max_batch and not queue:
            raise ValueError(f"{len(prompts)} prompts > max_batch={self.max_batch} (pass "
                             f"queue=True to run them through the slots in turn)")
        vocab = self.cfg.vocab_size
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) + max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} it needs {len(p) + max_new_tokens} positions "
                                 f"> max_seq_len={self.max_seq_len}")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        return prompts

    def sync_weights(self) -> None:
        """Pick up parameter values changed in the models since this decoder was built (the
        decoder holds the parameter arrays it was given; flattening the models on every call
        would cost milliseconds)."""
        self._st = nnx.state(self.target)
        if isinstance(self, SpeculativeDecoder):
            self._sd = nnx.state(self.draft)

    # -- jit plumbing ----------------------------------------------------------------------------
    @property
    def trace_counts(self) -> collections.Counter:
        """How often each step function was traced (process-wide: decoders over models of the
        same structure share their compiled step functions)."""
        return TRACE_COUNTS

    def _jit(self, name, key, build, donate, variant=()):
        # per-decoder memo first: hashing the graphdefs in `key` costs milliseconds per step
        local = self.__dict__.setdefault("_local_jit", {})
        if (name, variant) in local:
            return local[(name, variant)]
        full = (name, key)
        if full not in _JIT_CACHE:
            fn = build()

            def counted(*args):
                TRACE_COUNTS[name] += 1
                return fn(*args)
            _JIT_CACHE[full] = jax.jit(counted, donate_argnums=donate)
        local[(name, variant)] = _JIT_CACHE[full]
        return _JIT_CACHE[full]

    def _prefill_fn(self, with_draft: bool):
        gt = self._gt
        gd = self._gd if with_draft else None
        feature_layers = self.feature_layers
        ops = self.ops

        def prefill(st, tcache, dstate, dcache, tokens, positions, kv_lens, page_idx, cu,
                    num_seqs, last_rows, temp, seeds, sample_pos, row_start, n_new, ctx_lens):
            target = nnx.merge(gt, st)
            h, feats, tcache = target.forward(tokens, positions, tcache, kv_lens, page_idx, cu,
                                              num_seqs, ops=ops,
                                              feature_layers=feature_layers if with_draft else ())
            logits = target.logits(h[last_rows])
            first = sample_tokens(logits, temp, seeds, sample_pos)
            if with_draft:
                draft = nnx.merge(gd, dstate)
                ctx = draft.context(feats)                                   # [T, H]
                t_pad = tokens.shape[0]
                n_max = min(t_pad, dcache[0][0].shape[2])     # a slot's rows fit its cache
                rows = jnp.clip(row_start[:, None] + jnp.arange(n_max), 0, t_pad - 1)
                # a prompt token's context position is its own position
                dcache = draft.append_rows(ctx, positions, rows, dcache, ctx_lens, n_new,
                                           ops=ops)
            return first, tcache, dcache
        return prefill

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, jobs, temp_of, seed_of):
        """jobs: list of (slot, prompt). Runs the prompts in chunks; returns {slot: first token}."""
        B = self.max_batch
        done = {slot: 0 for slot, _ in jobs}
        prompts = dict(jobs)
        first_tokens = {}
        with_draft = isinstance(self, SpeculativeDecoder)
        while any(done[s] < len(prompts[s]) for s in done):
            budget, chunk = self.prefill_chunk, []
            for slot, p in jobs:
                rem = len(p) - done[slot]
                if rem > 0 and budget > 0:
                    n = min(rem, budget)
                    chunk.append((slot, done[slot], n))
                    budget -= n
            total = sum(n for _, _, n in chunk)
            t_pad = max(8, _next_pow2(total))
            tokens = np.zeros(t_pad, np.int32)
            positions = np.zeros(t_pad, np.int32)
            kv_lens = np.zeros(B, np.int32)
            page_idx = np.full((B, self.pages_per_seq), self.allocator.unused_index, np.int32)
            cu = np.zeros(B + 1, np.int32)
            last_rows = np.zeros(B, np.int32)
            temp = np.zeros(B, np.float32)
            seeds = np.zeros(B, np.int32)
            sample_pos = np.zeros(B, np.int32)
            row_start = np.zeros(B, np.int32)
            n_new = np.zeros(B, np.int32)
            ctx_lens = np.zeros(B, np.int32)
            r = 0
            for s, (slot, start, n) in enumerate(chunk):
                tokens[r:r + n] = prompts[slot][start:start + n]
                positions[r:r + n] = np.arange(start, start + n)
                kv_lens[s] = start + n
                page_idx[s] = self.allocator.page_table[slot]
                cu[s + 1] = r + n
                last_rows[s] = r + n - 1
                temp[s], seeds[s], sample_pos[s] = temp_of(slot), seed_of(slot), start + n
                row_start[slot], n_new[slot], ctx_lens[slot] = r, n, start
                r += n
            cu[len(chunk) + 1:] = r
            key = (self._gt, self._gd if with_draft else None, self.feature_layers, self.backend)
            fn = self._jit("prefill", key, lambda: self._prefill_fn(with_draft), donate=(1, 3),
                           variant=(with_draft,))
            dstate = self._sd if with_draft else None
            dcache = self.draft_cache if with_draft else None
            first, self.target_cache, dcache = fn(
                self._st, self.target_cache, dstate, dcache, tokens, positions, kv_lens, page_idx,
                cu, np.int32(len(chunk)), last_rows, temp, seeds, sample_pos, row_start, n_new,
                ctx_lens)
            if with_draft:
                self.draft_cache = dcache
            first = np.asarray(first)
            for s, (slot, start, n) in enumerate(chunk):
                done[slot] = start + n
                if done[slot] == len(prompts[slot]):
                    first_tokens[slot] = int(first[s])
        for slot, p in jobs:
            self.slot_len[slot] = len(p)
            self.slot_tokens[slot] = list(p)
        return first_tokens

    # -- the host loop ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, seed: int = 0,
                 eos_token_id: int | Iterable[int] | None = None, queue: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> GenerationOutput:
        """Generate up to `max_new_tokens` tokens for every prompt (lists of token ids).

        temperature 0 = greedy; > 0 samples (exactly from softmax(logits / T), per sequence seed
        derived from `seed` and the prompt's index, so outputs do not depend on batch layout).
        Sequences stop at EOS (included in the output) or after max_new_tokens. With
        queue=True more prompts than max_batch may be given: they wait for a free slot.
        `progress(tokens_generated, steps)` is called after every decode step.
        """
        prompts = self._check_request(prompts, max_new_tokens, temperature, queue)
        eos = set() if eos_token_id is None else (
            {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer))
            else {int(e) for e in eos_token_id})
        n = len(prompts)
        out = [[] for _ in range(n)]
        taus = [[] for _ in range(n)]
        reasons = [""] * n
        pending = collections.deque(range(n))
        slot_req = [-1] * self.max_batch          # request in each slot, -1 = free
        last = np.zeros(self.max_batch, np.int32)
        seeds = np.array([(seed * 1_000_003 + i) % (2**31 - 1) for i in range(n)], np.int64)
        steps, generated = 0, 0
        decode_time = 0.0

        def emit(slot, toks):
            """Append tokens to the slot's request; True when it finished."""
            req = slot_req[slot]
            for t in toks:
                out[req].append(int(t))
                if int(t) in eos:
                    reasons[req] = "eos"
                    return True
                if len(out[req]) >= max_new_tokens:
                    reasons[req] = "length"
                    return True
            return False

        def finish(slot):
            self.allocator.free(slot)
            slot_req[slot] = -1

        try:
            while pending or any(r >= 0 for r in slot_req):
                jobs = []
                for slot in range(self.max_batch):
                    if slot_req[slot] >= 0 or not pending:
                        continue
                    req = pending[0]
                    need = len(prompts[req]) + max_new_tokens + self.extra_positions
                    if not self.allocator.can_allocate(slot, need):
                        break
                    pending.popleft()
                    self.allocator.ensure(slot, need)
                    slot_req[slot] = req
                    jobs.append((slot, prompts[req]))
                if not jobs and not any(r >= 0 for r in slot_req):
                    raise RuntimeError(f"not enough KV pages for prompt {pending[0]} "
                                       f"({self.allocator.num_free} free of {self.num_pages})")
                if jobs:
                    firsts = self._prefill(jobs, lambda s: temperature,
                                           lambda s: int(seeds[slot_req[s]]))
                    for slot, _ in jobs:
                        last[slot] = firsts[slot]
                        generated += 1
                        if emit(slot, [firsts[slot]]):
                            finish(slot)
                active = [s for s in range(self.max_batch) if slot_req[s] >= 0]
                if not active:
                    continue
                ts = time.perf_counter()
                accepted = self._decode_step(active, last, temperature,
                                             {s: int(seeds[slot_req[s]]) for s in active}, slot_req,
                                             out)
                decode_time += time.perf_counter() - ts
                steps += 1
                for slot, toks in accepted.items():
                    req = slot_req[slot]
                    before = len(out[req])
                    if self.extra_positions > 1:
                        taus[req].append(len(toks))
                    done = emit(slot, toks)
                    generated += len(out[req]) - before
                    last[slot] = toks[-1]
                    if done:
                        finish(slot)
                if progress is not None:
                    progress(generated, steps)
        finally:                              # on error too: no slot keeps its pages
            for slot in range(self.max_batch):
                if slot_req[slot] >= 0:
                    finish(slot)
        return GenerationOutput(out, taus, reasons, steps, decode_time)


class AutoregressiveDecoder(_Engine):
    """Plain decoding (one target step per token) over the same kernels and cache."""

    extra_positions = 1

    def _step_fn(self):
        gt, ops = self._gt, self.ops
        B = self.max_batch

        def step(st, tcache, last, lens, order, num_seqs, page_idx, temp, seeds):
            target = nnx.merge(gt, st)
            live = jnp.arange(B) < num_seqs
            kv_lens = jnp.where(live, lens[order] + 1, 0)
            cu = jnp.minimum(jnp.arange(B + 1), num_seqs).astype(jnp.int32)
            h, _, tcache = target.forward(last[order], lens[order], tcache, kv_lens, page_idx,
                                          cu, num_seqs, ops=ops)
            inv = jnp.argsort(order)
            logits = target.logits(h[inv])
            return sample_tokens(logits, temp, seeds, lens + 1), tcache
        return step

    def _decode_step(self, active, last, temperature, seed_of, slot_req, out):
        B = self.max_batch
        order = np.array(active + [s for s in range(B) if s not in active], np.int32)
        lens = np.where(np.isin(np.arange(B), active), self.slot_len, 0).astype(np.int32)
        temp = np.full(B, temperature, np.float32)
        seeds = np.array([seed_of.get(s, 0) for s in range(B)], np.int32)
        fn = self._jit("ar_step", (self._gt, B, self.backend), self._step_fn, donate=(1,))
        nxt, self.target_cache = fn(self._st, self.target_cache, last.astype(np.int32), lens,
                                    order, np.int32(len(active)),
                                    self.allocator.page_table[order], temp, seeds)
        nxt = np.asarray(nxt)
        result = {}
        for s in active:
            self.slot_tokens[s].append(int(last[s]))
            self.slot_len[s] += 1
            result[s] = [int(nxt[s])]
        return result


class SpeculativeDecoder(_Engine):
    """DFlash speculative decoding: draft a block in one pass, verify it with the target.

    block_size defaults to the draft config's (the size it was trained for; a different one runs
    but drafts worse). max_seq_len bounds prompt + max_new_tokens; the caches hold block_size
    positions more (the verify block is written past the committed length).

    `proposal_override` (tests, experiments): a callable (request index, tokens generated so
    far for it, bs - 1) -> int array [bs - 1] or None, whose entries >= 0 replace the draft
    model's proposals for that sequence (the draft model still runs and keeps its context, so its
    state can be checked). See `models.testing`.

    The decoder holds the parameter arrays the models had when it was built: after changing the
    weights, call `sync_weights()`.
    """

    def __init__(self, target: TargetModel, draft: DraftModel, *, max_batch: int,
                 max_seq_len: int, page_size: int = 16, backend: str = "xla",
                 prefill_chunk: int = 256, num_pages: int | None = None, poison: bool = False,
                 block_size: int | None = None, proposal_override: Callable | None = None):
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
        super().__init__(target, max_batch=max_batch, max_seq_len=max_seq_len,
                         page_size=page_size, backend=backend, prefill_chunk=prefill_chunk,
                         num_pages=num_pages, poison=poison)
        self.draft = draft
        self._gd, self._sd = nnx.split(draft)
        d = draft.config
        # capacity: every committed position plus one block; a multiple of 16 rows (the Pallas
        # kernels move cache rows in whole (8|16, 128) HBM tiles)
        self.max_ctx = -(-(max_seq_len + self.block_size) // 16) * 16
        self.draft_cache = make_context_cache(d.num_layers, max_batch, d.num_kv_heads,
                                              self.max_ctx, d.head_dim, draft.dtype,
                                              float("nan") if poison else 0.0)
        self.proposal_override = proposal_override

    def _step_fn(self, greedy: bool, override: bool):
        gt, gd, ops = self._gt, self._gd, self.ops
        B, bs = self.max_batch, self.block_size
        mask_id = self.draft.config.mask_token_id
        feature_layers = self.feature_layers

        def step(st, tcache, sd, dcache, last, lens, active, order, num_seqs, page_idx, temp,
                 seeds, ext):
            target = nnx.merge(gt, st)
            draft = nnx.merge(gd, sd)
            # 1. draft: [last, MASK...] at positions [L, L+bs), context = positions 0..L-1
            block = jnp.concatenate(
                [last[:, None], jnp.full((B, bs - 1), mask_id, jnp.int32)], axis=1)
            pos = lens[:, None] + jnp.arange(bs, dtype=jnp.int32)
            h = draft(target.embed(block), pos, dcache, lens, ops=ops)
            drafts = jnp.argmax(target.logits(h[:, 1:]), axis=-1).astype(jnp.int32)
            if override:
                drafts = jnp.where(ext >= 0, ext, drafts)
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
                res = ops.verify_accept(logits, drafts)
            else:
                res = ops.verify_accept(logits, drafts, temperature=temp, seed=seeds,
                                        position=lens)
            num_acc = res.num_accepted.astype(jnp.int32)
            # 4. commit: exactly the accepted positions' features join the draft context
            n_new = jnp.where(active, num_acc + 1, 0).astype(jnp.int32)
            dcache = draft.append_context(feats, pos, dcache, lens, n_new, ops=ops)
            return num_acc, res.tokens, drafts, tcache, dcache
        return step

    def _decode_step(self, active, last, temperature, seed_of, slot_req, out):
        B, bs = self.max_batch, self.block_size
        is_live = np.isin(np.arange(B), active)
        order = np.array(active + [s for s in range(B) if s not in active], np.int32)
        lens = np.where(is_live, self.slot_len, 0).astype(np.int32)
        temp = np.full(B, temperature, np.float32)
        seeds = np.array([seed_of.get(s, 0) for s in range(B)], np.int32)
        override = self.proposal_override is not None
        ext = np.full((B, bs - 1), -1, np.int32)
        if override:
            for s in active:
                prop = self.proposal_override(slot_req[s], list(out[slot_req[s]]), bs - 1)
                if prop is not None:
                    ext[s] = np.asarray(prop, np.int32)[:bs - 1]
        greedy = temperature == 0
        key = (self._gt, self._gd, B, bs, self.draft.config.mask_token_id, self.feature_layers,
               self.backend, greedy, override)
        fn = self._jit("spec_step", key, lambda: self._step_fn(greedy, override), donate=(1, 3),
                       variant=(greedy, override))
        num_acc, tokens, drafts, self.target_cache, self.draft_cache = fn(
            self._st, self.target_cache, self._sd, self.draft_cache, last.astype(np.int32), lens,
            is_live, order, np.int32(len(active)), self.allocator.page_table[order], temp, seeds,
            ext)
        num_acc, tokens, drafts = np.asarray(num_acc), np.asarray(tokens), np.asarray(drafts)
        result = {}
        for s in active:
            a = int(num_acc[s])
            if tokens[s, a] < 0:
                raise FloatingPointError(f"verify/accept rejected slot {s}'s target logits "
                                         f"(NaN or all -inf) at position {lens[s]}")
            self.slot_tokens[s].extend([int(last[s])] + [int(t) for t in drafts[s, :a]])
            self.slot_len[s] += a + 1
            result[s] = [int(t) for t in tokens[s, :a + 1]]
        return result


_AR_DECODERS: dict = {}   # reuse compiled step functions across calls (sizes rounded up)


def generate_autoregressive(target: TargetModel, prompts, *, max_new_tokens: int,
                            temperature: float = 0.0, seed: int = 0, eos_token_id=None,
                            max_batch: int | None = None, max_seq_len: int | None = None,
                            page_size: int = 16, backend: str = "xla",
                            poison: bool = False) -> GenerationOutput:
    """Plain decoding baseline over the same kernels and cache.

    Runs an `AutoregressiveDecoder` sized for these prompts (max_batch and max_seq_len default to
    powers of two above what the prompts need; decoders are cached per target and size, so
    repeated calls do not recompile). Same arguments and result as `SpeculativeDecoder.generate`
    (acceptance_lengths empty)."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    max_batch = max_batch or _next_pow2(len(prompts))
    max_seq_len = max_seq_len or _next_pow2(max(len(p) for p in prompts) + max_new_tokens)
    key = (id(target), max_batch, max_seq_len, page_size, backend, poison)
    dec = _AR_DECODERS.get(key)
    if dec is not None and dec.target is target:
        dec.sync_weights()
    else:
        dec = AutoregressiveDecoder(target, max_batch=max_batch, max_seq_len=max_seq_len,
                                    page_size=page_size, backend=backend, poison=poison)
        if len(_AR_DECODERS) >= 8:
            _AR_DECODERS.pop(next(iter(_AR_DECODERS)))
        _AR_DECODERS[key] = dec
    return dec.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, eos_token_id=eos_token_id)


def print_progress(every: int = 16, stream=sys.stderr):
    """A `progress` callback printing tokens generated every `every` steps."""
    start = time.perf_counter()

    def cb(generated, steps):
        if steps % every == 0:
            dt = time.perf_counter() - start
            print(f"[{steps} steps] {generated} tokens, {generated / max(dt, 1e-9):.1f} tok/s",
                  file=stream, flush=True)
    return cb


__all__ = ["AutoregressiveDecoder", "GenerationOutput", "SpeculativeDecoder",
           "generate_autoregressive", "print_progress"]
