"""The peer of block_attention: how vLLM tpu-inference runs the DFlash draft's attention.

Not a dependency of this project: it needs `pip install --no-deps tpu-inference==0.32.0` beside
jax >= 0.11 (this module raises ModuleNotFoundError without it, and `bench static` skips it).
The kernel is RPA v3, loaded as `bench.kernels.peer_rpa_v3` loads it (its block sizes: its
defaults for the chip, as there).

tpu-inference's DFlash draft layer (`models/jax/qwen3_dflash.py`, attention impl
"concat_dense", its default) runs RPA v3 (`kernels/ragged_paged_attention/v3/kernel.py`)
twice per layer over the draft's PAGED cache, the draft's KV cache group with the engine's
page size (the target's `cache_config.block_size`; 16 here):

1. the context K/V of the step's new target tokens written into the cache: zero queries
   (`jnp.zeros`, [T, Hq, D], its call makes them), k_ctx / v_ctx, query_start_loc = the new
   target tokens' (`target_query_start_loc`), kv_lens = seq_lens (the context, counting them),
   use_causal_mask=True, update_kv_cache=True; its output is discarded;
2. the bs noise queries of each request against context + block: q, k_noise / v_noise,
   query_start_loc = arange(B + 1) * bs, kv_lens = seq_lens + bs, use_causal_mask=False,
   update_kv_cache=True (the block's K/V written after the context), over call 1's cache.

Mapped to a block-attention shape (B, bs, ctx_len, S_max): T = B * bs tokens in both calls
(its layer requires as many target tokens as noise tokens, B * bs); the new context tokens per
request = bs, the most one step accepts (every draft and the bonus), so both query_start_locs
are arange(B + 1) * bs; seq_lens = ctx_len; a page table of ceil((S_max + bs) / 16) pages per
request (call 2 reaches ctx_len + bs); distribution (0, 0, B), the target's verify step's (no
request has <= max_decode_tokens = 1 token), so both calls are its MIXED case. Each
`ragged_paged_attention` call lowers to TWO pallas_calls, its decode kernel (over the empty
decode range (0, 0): it runs no sequence) then its mixed one: the compiled program has four
custom calls, RPAd-..., RPAm-..., RPAd-..., RPAm-..., the two of each kind with the same name
(the same block sizes). The engine runs the calls under `jax.shard_map` over its mesh (KV
heads on "model"); on one device that is the identity, left out here. Not donated here (its
runner donates the caches), so XLA copies the cache around the aliased calls: outside the
kernels' main loops.

`main_loop` returns one MainLoop per mixed call (the two decode calls are not described);
`bench static` matches the k-th MainLoop to the k-th custom call of that name.
"""
from __future__ import annotations

import numpy as np

from bench.kernels import shape_finder
from bench import shapes as shapes_mod
from bench.kernels import block as block_mod
from bench.kernels import peer_rpa_v3   # ModuleNotFoundError without tpu-inference

KERNEL = "peer_rpa_v3_draft"
PAGE_SIZE = 16


def shapes() -> list:
    """The bf16 block-attention shapes (the names of block_attention's)."""
    return [s for s in shapes_mod.BLOCK_ATTENTION if not s.quantized]


find = shape_finder(KERNEL, shapes)


def pages_per_seq(shape) -> int:
    return -(-(shape.max_ctx + shape.block_size) // PAGE_SIZE)


def _case():
    """Both calls' case, from their distribution (0, 0, B): every request in the mixed range."""
    return peer_rpa_v3._load().RpaCase.MIXED


def block_sizes(shape, chip: str) -> dict:
    """Its default (bq_sz, bkv_sz, bq_csz, bkv_csz) for the mixed case (the same both calls)."""
    import jax.numpy as jnp

    k = peer_rpa_v3._load()
    k.get_tpu_version = lambda: peer_rpa_v3._VERSION[chip]
    dt = jnp.dtype(shape.dtype)
    return k.get_default_block_sizes(dt, dt, shape.num_q_heads, shape.num_kv_heads,
                                     shape.head_dim, PAGE_SIZE, shape.batch * shape.block_size,
                                     shape.batch, pages_per_seq(shape), case=_case())


def call_name(shape, chip: str) -> str:
    """The mixed calls' name (both the same)."""
    b = block_sizes(shape, chip)
    return (f"RPA{_case().symbol}-p_{PAGE_SIZE}-bq_{b['bq_sz']}_{b['bq_csz']}"
            f"-bkv_{b['bkv_sz']}_{b['bkv_csz']}")


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(q, k_ctx, v_ctx, k_noise, v_noise, kv_cache, seq_lens, page_indices,
    target_query_start_loc, query_start_loc, distribution) -> (out [T, Hq, D], kv_cache)."""
    import jax
    import jax.numpy as jnp

    k = peer_rpa_v3._load()
    k.get_tpu_version = lambda: peer_rpa_v3._VERSION[chip]
    dt = jnp.dtype(shape.dtype)
    B, bs = shape.batch, shape.block_size
    hq, hkv, d = shape.num_q_heads, shape.num_kv_heads, shape.head_dim
    t, pps = B * bs, pages_per_seq(shape)
    packing = 4 // dt.itemsize
    S = jax.ShapeDtypeStruct
    tok_q, tok_kv = S((t, hq, d), dt), S((t, hkv, d), dt)
    args = (tok_q, tok_kv, tok_kv, tok_kv, tok_kv,
            S((B * pps, PAGE_SIZE, 2 * hkv // packing, packing, d), dt), S((B,), jnp.int32),
            S((B * pps,), jnp.int32), S((B + 1,), jnp.int32), S((B + 1,), jnp.int32),
            S((3,), jnp.int32))
    sm_scale = d ** -0.5

    def draft_attention(q, k_ctx, v_ctx, k_noise, v_noise, kv_cache, seq_lens, page_indices,
                        target_query_start_loc, query_start_loc, distribution):
        q_target = jnp.zeros((k_ctx.shape[0], hq, d), dtype=q.dtype)
        _, kv_cache = k.ragged_paged_attention(
            q_target, k_ctx, v_ctx, kv_cache, seq_lens, page_indices, target_query_start_loc,
            distribution, sm_scale=sm_scale, use_causal_mask=True, update_kv_cache=True)
        block = q.shape[0] // seq_lens.shape[0]
        return k.ragged_paged_attention(
            q, k_noise, v_noise, kv_cache, seq_lens + block, page_indices, query_start_loc,
            distribution, sm_scale=sm_scale, use_causal_mask=False, update_kv_cache=True)

    return draft_attention, args


def hbm_bytes(shape) -> int:
    """block_attention's compulsory bytes (the context K/V once, the block's q/k/v, out)."""
    return block_mod.hbm_bytes(shape)


flops = block_mod.flops


def _loop(shape, chip: str, kv: int, causal: bool):
    """One call's MainLoop: B sequences of bs queries over kv keys (peer_rpa_v3.main_loop's
    counting, but bytes per iteration the keys a block actually fetches, on average; the
    cache-update loop counted 1 when at least half the blocks hold the new tokens)."""
    from bench.static import MainLoop

    b = block_sizes(shape, chip)
    q, bq = shape.block_size, b["bq_sz"]
    iterations = chunks = keys = 0
    for i in range(-(-q // bq)):
        effective = min(kv, kv - q + (i + 1) * bq) if causal else kv
        blocks = -(-effective // b["bkv_sz"])
        iterations += blocks
        for j in range(blocks):
            rows = min(effective - j * b["bkv_sz"], b["bkv_sz"])
            keys += rows
            chunks += -(-rows // b["bkv_csz"])
    update = int(1 / iterations + 0.5)   # the new tokens sit in one block of the sequence
    item = 2 if shape.dtype == "bfloat16" else np.dtype(shape.dtype).itemsize
    return MainLoop(
        call_name=call_name(shape, chip),
        # its block fetch DMAs the keys left, not a whole bkv_sz block (ctx 512: 512 keys)
        bytes_per_iteration=int(2 * shape.num_kv_heads * keys / iterations * shape.head_dim
                                * item),
        iterations=iterations * shape.batch,
        cores=1,
        # the loop enclosing it runs once per (sequence, q block): its q fetch, init and
        # output store (~5.4k bundles on v5p at these shapes), charged that many times
        outer_iterations=shape.batch * -(-q // bq),
        inner_trips=(update, max(1, round(chunks / iterations))),
    )


def main_loop(shape, *, chip: str = "v5p"):
    """(call 1, call 2): the KV-block loop of each mixed call (one iteration: up to bkv_sz keys
    of every head, K and V). Call 1: ctx_len keys, causal; call 2: ctx_len + bs keys, no mask.
    Nested loops as peer_rpa_v3's (checked with `--loops` on v5p, libtpu 0.0.50.1, at
    qwen3-8b-drafter-b32-bs16-ctx512/2048/8192; the same for both calls): the cache update of
    the new tokens' pages (17 bundles), then the bkv_csz-key compute chunks (~20.9k bundles
    each: its q block is bq_sz = 256 tokens of which a request has bs)."""
    return (_loop(shape, chip, shape.ctx_len, True),
            _loop(shape, chip, shape.ctx_len + shape.block_size, False))
