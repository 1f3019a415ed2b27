"""What the speculative and the autoregressive decoders share: slots, pages, prefill, the host
loop.

Host state per slot: the committed length L (target KV and draft context both hold positions
0..L-1), the last emitted token (fed at position L next), pages (`PageAllocator`). Sequences
finish independently (EOS or max_new_tokens); their pages are freed and the slot can take a new
prompt.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import check_kv_cache_dtype, make_paged_cache
from pallas_ops.paged.validation import QUANTIZED_PAGE_SIZES
from models import parallel
from models.parallel import check_mesh
from models.ops import get_ops
from models.page_allocator import PageAllocator
from models.decoding.params import SamplingParams
from models.sampling import sample_tokens
from jax.sharding import PartitionSpec as P
from models.target import TargetModel

UNUSED_PAGE = 2**30   # page-table filler when poison=True: a stray read of it fails loudly
TRACE_COUNTS: collections.Counter = collections.Counter()
_JIT_CACHE: dict = {}


@dataclasses.dataclass
class GenerationOutput:
    """Per prompt (in input order): generated tokens (prompt excluded, EOS included when hit),
    acceptance lengths of every speculative step (tau = accepted drafts + 1; empty for
    autoregressive decoding) and why it stopped ("eos" or "length"). With
    `generate(..., logprobs=True)`, `logprobs[i][j]` is the natural-log probability of
    tokens[i][j] under the distribution it was emitted from (sampling: the tempered, filtered
    target distribution; greedy: softmax of the target's logits); else None."""
    tokens: list[list[int]]
    acceptance_lengths: list[list[int]]
    finish_reasons: list[str]
    num_steps: int = 0          # decode steps (device calls) after prefill
    decode_seconds: float = 0.0
    logprobs: list[list[float]] | None = None

    @property
    def mean_acceptance(self) -> float:
        taus = [t for seq in self.acceptance_lengths for t in seq]
        return float(np.mean(taus)) if taus else float("nan")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class Engine:
    """What the speculative and the autoregressive decoders share: target, pages, prefill."""

    has_draft = False   # a subclass with a draft model (its context cache is filled at prefill)

    extra_positions = 1      # positions written past L in one step

    def __init__(self, target: TargetModel, *, max_batch: int, max_seq_len: int,
                 page_size: int = 16, backend: str = "xla", prefill_chunk: int = 256,
                 num_pages: int | None = None, poison: bool = False, kv_cache_dtype=None,
                 mesh=None, abstract: bool = False):
        if not isinstance(target, TargetModel):
            raise TypeError(f"target must be a TargetModel, got {type(target).__name__}")
        for name, v in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                        ("page_size", page_size), ("prefill_chunk", prefill_chunk)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if prefill_chunk & (prefill_chunk - 1):
            raise ValueError(f"prefill_chunk must be a power of two, got {prefill_chunk}")
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        if self.kv_cache_dtype and page_size not in QUANTIZED_PAGE_SIZES:
            raise ValueError(f"page_size={page_size} not supported with kv_cache_dtype="
                             f"{self.kv_cache_dtype!r}: must be one of {QUANTIZED_PAGE_SIZES}")
        self.target = target
        self.cfg = target.config
        # tensor / data parallelism (`models.parallel`): None = one device
        self.layout = (check_mesh(mesh, target.config, getattr(self, "_draft_config", None),
                                  max_batch=max_batch, num_pages=num_pages)
                       if mesh is not None else None)
        self.groups = self.layout.data if self.layout else 1
        # the vocabulary is split only over a model axis of size > 1 (of size 1 every shard holds
        # whole rows: the ops run as on one device, the filters included)
        self.ops = get_ops(backend, model_axis=self.model_axis)
        self.backend = backend
        self.max_batch, self.max_seq_len, self.page_size = max_batch, max_seq_len, page_size
        self.prefill_chunk = prefill_chunk
        self.poison = poison
        self.pages_per_seq = -(-(max_seq_len + self.extra_positions) // page_size)
        self.num_pages = num_pages if num_pages is not None else max_batch * self.pages_per_seq
        self.allocator = PageAllocator(self.num_pages, page_size, max_batch, self.pages_per_seq,
                                       unused_index=UNUSED_PAGE if poison else 0,
                                       parts=self.groups)
        fill = float("nan") if poison else 0.0
        c = self.cfg
        # abstract (AOT compiles, `models.aot`): shapes only, nothing allocated
        self.abstract = abstract
        self.target_cache = self._make(lambda: make_paged_cache(
            c.num_layers, self._kv_heads("target"), self.num_pages, page_size, c.head_dim,
            target.dtype, fill, kv_cache_dtype=self.kv_cache_dtype))
        if self.layout:
            self.target_cache = parallel.place(self.target_cache,
                                               parallel.paged_cache_spec(self.target_cache),
                                               self.layout)
        self._gt, self._st = nnx.split(target)
        self._st, self._st_spec = self._place_weights(self._st, self.cfg, "target")
        # host state per slot
        self.slot_len = np.zeros(max_batch, np.int64)          # committed length L
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # tokens at 0..L-1

    feature_layers: tuple[int, ...] = ()   # target layers whose outputs the draft reads

    @property
    def model_axis(self):
        """The mesh axis the heads and the vocabulary are split over, or None (one device, or a
        model axis of size 1)."""
        return "model" if self.layout is not None and self.layout.model > 1 else None

    # -- parallelism -----------------------------------------------------------------------------
    def _kv_heads(self, model):
        """KV heads in the caches and k/v projections: the config's, or, replicated over a larger
        model axis, one per model device (`models.parallel`)."""
        if not self.layout:
            return (self.cfg if model == "target" else self._draft_config).num_kv_heads
        return self.layout.target_kv_heads if model == "target" else self.layout.draft_kv_heads

    def _make(self, build):
        """build() (device arrays), or its ShapeDtypeStructs when the decoder is abstract."""
        return jax.eval_shape(build) if self.abstract else build()

    def _place_weights(self, state, cfg, model):
        """(state, PartitionSpecs): unchanged on one device, else sharded over the mesh."""
        if not self.layout:
            return state, None
        return parallel.shard_state(state, cfg, self._kv_heads(model), self.layout)

    def _sharded(self, fn, in_specs, out_specs):
        """fn as the per-shard body of a shard_map over the mesh (unchanged on one device)."""
        if not self.layout:
            return fn
        return jax.shard_map(fn, mesh=self.layout.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)

    def _group_order(self, active):
        """Live-first order of the slots inside each data group, as (local indices [B], global
        slots [B], live count per group [groups])."""
        per = self.max_batch // self.groups
        local, glob, counts = [], [], []
        for g in range(self.groups):
            slots = range(g * per, (g + 1) * per)
            live = [s for s in slots if s in active]
            rest = [s for s in slots if s not in active]
            glob += live + rest
            local += [s - g * per for s in live + rest]
            counts.append(len(live))
        return (np.array(local, np.int32), np.array(glob, np.int32),
                np.array(counts, np.int32))

    # -- validation ------------------------------------------------------------------------------
    def _check_request(self, prompts, max_new_tokens, queue):
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
            prompts = [prompts]
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
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
        self._st, _ = self._place_weights(nnx.state(self.target), self.cfg, "target")
        if self.has_draft:
            self._sd, _ = self._place_weights(nnx.state(self.draft), self.draft.config, "draft")

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
        # under a mesh the shard_map specs follow the caches' structure (8-bit: 4 arrays a layer)
        full = (name, key, self.layout, self.kv_cache_dtype if self.layout else None)
        if full not in _JIT_CACHE:
            fn = build()

            def counted(*args):
                TRACE_COUNTS[name] += 1
                return fn(*args)
            _JIT_CACHE[full] = jax.jit(counted, donate_argnums=donate)
        local[(name, variant)] = _JIT_CACHE[full]
        return _JIT_CACHE[full]

    def _specs(self, with_draft: bool):
        """shard_map specs of (target state, target cache, draft state, draft cache)."""
        if not self.layout:
            return None, None, None, None
        tc = parallel.paged_cache_spec(self.target_cache)
        if not with_draft:
            return self._st_spec, tc, P(), P()
        return (self._st_spec, tc, self._sd_spec,
                parallel.context_cache_spec(self.draft_cache))

    def _prefill_fn(self, with_draft: bool, filtered: bool = False, logprobs: bool = False):
        gt = self._gt
        gd = self._gd if with_draft else None
        feature_layers = self.feature_layers
        ops = self.ops

        def prefill(st, tcache, dstate, dcache, tokens, positions, kv_lens, page_idx, cu,
                    num_seqs, last_rows, temp, seeds, sample_pos, row_start, n_new, ctx_lens,
                    filt):
            # per data group (one group on one device): a flat ragged batch of its chunk
            num_seqs = num_seqs[0]
            target = nnx.merge(gt, st)
            h, feats, tcache = target.forward(tokens, positions, tcache, kv_lens, page_idx, cu,
                                              num_seqs, ops=ops,
                                              feature_layers=feature_layers if with_draft else ())
            logits = target.logits(h[last_rows])
            fkw = dict(zip(("top_k", "top_p", "min_p"), filt)) if filtered else {}
            first = sample_tokens(logits, temp, seeds, sample_pos, vocab_axis=ops.model_axis,
                                  return_logprobs=logprobs, **fkw)
            first, lp = first if logprobs else (first, jnp.zeros(first.shape, jnp.float32))
            if with_draft:
                draft = nnx.merge(gd, dstate)
                ctx = draft.context(feats)                                   # [T, H]
                t_pad = tokens.shape[0]
                n_max = min(t_pad, dcache[0][0].shape[2])     # a slot's rows fit its cache
                rows = jnp.clip(row_start[:, None] + jnp.arange(n_max), 0, t_pad - 1)
                # a prompt token's context position is its own position
                dcache = draft.append_rows(ctx, positions, rows, dcache, ctx_lens, n_new,
                                           ops=ops)
            return first, lp, tcache, dcache
        if not self.layout:
            return prefill
        st, tc, sd, dc = self._specs(with_draft)
        d = P("data")
        return self._sharded(prefill, (st, tc, sd, dc) + (d,) * 14, (d, d, tc, dc))

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, jobs, params: SamplingParams, slot_req):
        """jobs: list of (slot, prompt); params: the requests' sampling parameters, slot_req: the
        request in each slot. Runs the prompts in chunks (per data group: its own flat batch of
        up to prefill_chunk tokens); returns {slot: (first token, its logprob or None)}."""
        per = self.max_batch // self.groups                  # slots per data group
        done = {slot: 0 for slot, _ in jobs}
        prompts = dict(jobs)
        first_tokens = {}
        with_draft = self.has_draft
        per_slot = params.per_slot(slot_req)
        filtered, logprobs = params.filtered, params.logprobs
        while any(done[s] < len(prompts[s]) for s in done):
            chunks = []                                       # per group: [(slot, start, n)]
            for g in range(self.groups):
                budget, chunk = self.prefill_chunk, []
                for slot, p in jobs:
                    rem = len(p) - done[slot]
                    if slot // per == g and rem > 0 and budget > 0:
                        n = min(rem, budget)
                        chunk.append((slot, done[slot], n))
                        budget -= n
                chunks.append(chunk)
            total = max(sum(n for _, _, n in c) for c in chunks)
            t_pad = max(8, next_pow2(total))
            G = self.groups
            tokens = np.zeros((G, t_pad), np.int32)
            positions = np.zeros((G, t_pad), np.int32)
            kv_lens = np.zeros((G, per), np.int32)
            page_idx = np.full((G, per, self.pages_per_seq), self.allocator.unused_index,
                               np.int32)
            cu = np.zeros((G, per + 1), np.int32)
            last_rows = np.zeros((G, per), np.int32)
            temp = np.zeros((G, per), np.float32)
            seeds = np.zeros((G, per), np.int32)
            top_k = np.zeros((G, per), np.int32)
            top_p = np.ones((G, per), np.float32)
            min_p = np.zeros((G, per), np.float32)
            sample_pos = np.zeros((G, per), np.int32)
            row_start = np.zeros((G, per), np.int32)
            n_new = np.zeros((G, per), np.int32)
            ctx_lens = np.zeros((G, per), np.int32)
            for g, chunk in enumerate(chunks):
                r = 0
                for s, (slot, start, n) in enumerate(chunk):
                    tokens[g, r:r + n] = prompts[slot][start:start + n]
                    positions[g, r:r + n] = np.arange(start, start + n)
                    kv_lens[g, s] = start + n
                    page_idx[g, s] = self.allocator.page_table[slot]
                    cu[g, s + 1] = r + n
                    last_rows[g, s] = r + n - 1
                    # the first token is sampled from the logits at the last prompt position
                    sample_pos[g, s] = start + n - 1
                    for name, arr in (("temp", temp), ("seeds", seeds), ("top_k", top_k),
                                      ("top_p", top_p), ("min_p", min_p)):
                        arr[g, s] = per_slot[name][slot]
                    local = slot - g * per                    # the draft cache's row
                    row_start[g, local], n_new[g, local], ctx_lens[g, local] = r, n, start
                    r += n
                cu[g, len(chunk) + 1:] = r
            key = (self._gt, self._gd if with_draft else None, self.feature_layers, self.backend,
                   filtered, logprobs)
            fn = self._jit("prefill", key,
                           lambda: self._prefill_fn(with_draft, filtered, logprobs),
                           donate=(1, 3), variant=(with_draft, filtered, logprobs))
            dstate = self._sd if with_draft else None
            dcache = self.draft_cache if with_draft else None
            flat = lambda a: a.reshape(G * a.shape[1], *a.shape[2:])   # noqa: E731
            num_seqs = np.array([len(c) for c in chunks], np.int32)
            first, lp, self.target_cache, dcache = fn(
                self._st, self.target_cache, dstate, dcache, flat(tokens), flat(positions),
                flat(kv_lens), flat(page_idx), flat(cu), num_seqs, flat(last_rows), flat(temp),
                flat(seeds), flat(sample_pos), flat(row_start), flat(n_new), flat(ctx_lens),
                (flat(top_k), flat(top_p), flat(min_p)))
            if with_draft:
                self.draft_cache = dcache
            first = np.asarray(first).reshape(G, per)
            lp = np.asarray(lp).reshape(G, per)
            for g, chunk in enumerate(chunks):
                for s, (slot, start, n) in enumerate(chunk):
                    done[slot] = start + n
                    if done[slot] == len(prompts[slot]):
                        first_tokens[slot] = (int(first[g, s]),
                                              float(lp[g, s]) if logprobs else None)
        for slot, p in jobs:
            self.slot_len[slot] = len(p)
            self.slot_tokens[slot] = list(p)
        return first_tokens

    # -- the host loop ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float | Sequence[float] = 0.0, seed: int = 0,
                 eos_token_id: int | Iterable[int] | None = None, queue: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 top_k: int | Sequence[int] | None = None,
                 top_p: float | Sequence[float] | None = None,
                 min_p: float | Sequence[float] | None = None,
                 logprobs: bool = False) -> GenerationOutput:
        """Generate up to `max_new_tokens` tokens for every prompt (lists of token ids).

        temperature 0 = greedy; > 0 samples (exactly from softmax(logits / T) after the filters,
        per sequence seed derived from `seed` and the prompt's index, so outputs do not depend on
        batch layout). top_k (int >= 0, 0 = off), top_p (in (0, 1], 1 = off), min_p (in [0, 1),
        0 = off): the filters of sampling sequences, in that order (semantics of
        `pallas_ops.verify_accept`); greedy sequences ignore them. Each of temperature, top_k,
        top_p and min_p is one value for every prompt or a sequence of one value per prompt
        (`models.decoding.params`; ValueError before anything runs). The filters are not
        supported with a mesh whose model axis is larger than 1 (ValueError).
        logprobs=True: `GenerationOutput.logprobs` holds each token's log-probability under the
        distribution it was emitted from.
        Sequences stop at EOS (included in the output) or after max_new_tokens. With
        queue=True more prompts than max_batch may be given: they wait for a free slot.
        `progress(tokens_generated, steps)` is called after every decode step.
        """
        if self.abstract:
            raise RuntimeError("an abstract decoder (abstract=True) only lowers its step "
                               "functions (models.aot); it has no device state to generate with")
        prompts = self._check_request(prompts, max_new_tokens, queue)
        params = SamplingParams.build(len(prompts), temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, seed=seed, logprobs=logprobs)
        if self.model_axis is not None and params.any_filter_set:
            raise ValueError(f"top_k / top_p / min_p are not supported with a mesh whose model "
                             f"axis has size {self.layout.model} (the vocabulary is split over "
                             f"it; the thresholds need whole rows): use a model axis of size 1")
        eos = set() if eos_token_id is None else (
            {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer))
            else {int(e) for e in eos_token_id})
        n = len(prompts)
        out = [[] for _ in range(n)]
        lps = [[] for _ in range(n)] if logprobs else None
        taus = [[] for _ in range(n)]
        reasons = [""] * n
        pending = collections.deque(range(n))
        slot_req = [-1] * self.max_batch          # request in each slot, -1 = free
        last = np.zeros(self.max_batch, np.int32)
        steps, generated = 0, 0
        decode_time = 0.0

        def emit(slot, toks, toks_lp):
            """Append tokens (and their logprobs) to the slot's request; True when it finished."""
            req = slot_req[slot]
            for i, t in enumerate(toks):
                out[req].append(int(t))
                if lps is not None:
                    lps[req].append(float(toks_lp[i]))
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
                    firsts = self._prefill(jobs, params, slot_req)
                    for slot, _ in jobs:
                        tok, tok_lp = firsts[slot]
                        last[slot] = tok
                        generated += 1
                        if emit(slot, [tok], [tok_lp]):
                            finish(slot)
                active = [s for s in range(self.max_batch) if slot_req[s] >= 0]
                if not active:
                    continue
                ts = time.perf_counter()
                accepted = self._decode_step(active, last, params, slot_req, out)
                decode_time += time.perf_counter() - ts
                steps += 1
                for slot, (toks, toks_lp) in accepted.items():
                    req = slot_req[slot]
                    before = len(out[req])
                    if self.extra_positions > 1:
                        taus[req].append(len(toks))
                    done = emit(slot, toks, toks_lp)
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
        return GenerationOutput(out, taus, reasons, steps, decode_time, lps)


def print_progress(every: int = 16, stream=sys.stderr):
    """A `progress` callback printing tokens generated every `every` steps."""
    start = time.perf_counter()

    def cb(generated, steps):
        if steps % every == 0:
            dt = time.perf_counter() - start
            print(f"[{steps} steps] {generated} tokens, {generated / max(dt, 1e-9):.1f} tok/s",
                  file=stream, flush=True)
    return cb
