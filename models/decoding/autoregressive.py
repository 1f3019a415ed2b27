"""The plain autoregressive baseline: one target step per token, same kernels and cache."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from models.decoding.engine import Engine, GenerationOutput, next_pow2
from models.decoding.params import SamplingParams
from models.sampling import sample_tokens
from models.target import TargetModel


class AutoregressiveDecoder(Engine):
    """Plain decoding (one target step per token) over the same kernels and cache. `mesh` and
    `abstract`: as for `SpeculativeDecoder`."""

    extra_positions = 1

    def _step_fn(self, filtered: bool = False, logprobs: bool = False):
        gt, ops = self._gt, self.ops

        def step(st, tcache, last, lens, order, num_seqs, page_idx, temp, seeds, filt):
            # per data group (one group on one device): B rows of its slots
            B = last.shape[0]
            num_seqs = num_seqs[0]
            target = nnx.merge(gt, st)
            live = jnp.arange(B) < num_seqs
            kv_lens = jnp.where(live, lens[order] + 1, 0)
            cu = jnp.minimum(jnp.arange(B + 1), num_seqs).astype(jnp.int32)
            h, _, tcache = target.forward(last[order], lens[order], tcache, kv_lens, page_idx,
                                          cu, num_seqs, ops=ops)
            inv = jnp.argsort(order)
            logits = target.logits(h[inv])
            # logits at position lens (the fed token): the same noise key verify_accept uses
            fkw = dict(zip(("top_k", "top_p", "min_p"), filt)) if filtered else {}
            nxt = sample_tokens(logits, temp, seeds, lens, vocab_axis=ops.model_axis,
                                return_logprobs=logprobs, **fkw)
            nxt, lp = nxt if logprobs else (nxt, jnp.zeros(nxt.shape, jnp.float32))
            return nxt, lp, tcache
        if not self.layout:
            return step
        st, tc, _, _ = self._specs(False)
        d = P("data")
        return self._sharded(step, (st, tc) + (d,) * 8, (d, d, tc))

    def _decode_step(self, active, last, params, slot_req, out):
        B = self.max_batch
        order, slots, num_seqs = self._group_order(active)
        lens = np.where(np.isin(np.arange(B), active), self.slot_len, 0).astype(np.int32)
        sp = params.per_slot(slot_req)
        filtered, logprobs = params.filtered, params.logprobs
        fn = self._jit("ar_step", (self._gt, B, self.backend, filtered, logprobs),
                       lambda: self._step_fn(filtered, logprobs), donate=(1,),
                       variant=(filtered, logprobs))
        nxt, lp, self.target_cache = fn(
            self._st, self.target_cache, last.astype(np.int32), lens, order, num_seqs,
            self.allocator.page_table[slots], sp["temp"], sp["seeds"],
            (sp["top_k"], sp["top_p"], sp["min_p"]))
        nxt, lp = np.asarray(nxt), np.asarray(lp)
        result = {}
        for s in active:
            self.slot_tokens[s].append(int(last[s]))
            self.slot_len[s] += 1
            result[s] = ([int(nxt[s])], [float(lp[s])] if logprobs else None)
        return result


_AR_DECODERS: dict = {}   # reuse compiled step functions across calls (sizes rounded up)


def generate_autoregressive(target: TargetModel, prompts, *, max_new_tokens: int,
                            temperature=0.0, seed: int = 0, eos_token_id=None,
                            max_batch: int | None = None, max_seq_len: int | None = None,
                            page_size: int = 16, backend: str = "xla",
                            poison: bool = False, kv_cache_dtype=None,
                            mesh=None, top_k=None, top_p=None, min_p=None,
                            logprobs: bool = False) -> GenerationOutput:
    """Plain decoding baseline over the same kernels and cache.

    Runs an `AutoregressiveDecoder` sized for these prompts (max_batch and max_seq_len default to
    powers of two above what the prompts need; decoders are cached per target and size, so
    repeated calls do not recompile). Same arguments and result as `SpeculativeDecoder.generate`
    (acceptance_lengths empty): temperature, top_k, top_p, min_p one value or one per prompt,
    logprobs (`Engine.generate`). kv_cache_dtype: None or an 8-bit cache (`models.kv_cache`).
    mesh: a `jax.sharding.Mesh` with axes "data" and "model" (`models.parallel`), or None."""
    prompts = [list(p) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    SamplingParams.build(len(prompts), temperature=temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p, seed=seed, logprobs=logprobs)     # bad values: fail first
    max_batch = max_batch or next_pow2(len(prompts))
    max_seq_len = max_seq_len or next_pow2(max(len(p) for p in prompts) + max_new_tokens)
    if mesh is not None:      # a data axis splits the batch: round it up to a multiple
        d = int(mesh.shape.get("data", 1))
        max_batch = -(-max_batch // d) * d
    key = (id(target), max_batch, max_seq_len, page_size, backend, poison, kv_cache_dtype, mesh)
    dec = _AR_DECODERS.get(key)
    if dec is not None and dec.target is target:
        dec.sync_weights()
    else:
        dec = AutoregressiveDecoder(target, max_batch=max_batch, max_seq_len=max_seq_len,
                                    page_size=page_size, backend=backend, poison=poison,
                                    kv_cache_dtype=kv_cache_dtype, mesh=mesh)
        if len(_AR_DECODERS) >= 8:
            _AR_DECODERS.pop(next(iter(_AR_DECODERS)))
        _AR_DECODERS[key] = dec
    return dec.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                        seed=seed, eos_token_id=eos_token_id, top_k=top_k, top_p=top_p,
                        min_p=min_p, logprobs=logprobs)
