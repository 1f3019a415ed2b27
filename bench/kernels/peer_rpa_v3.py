"""The peer: vLLM tpu-inference's ragged paged attention v3 (RPA v3), at the paged shapes.

Not a dependency of this project: it needs `pip install --no-deps tpu-inference==0.32.0` into a
separate venv beside jax >= 0.11 (this module fails to import without it, and `bench static`
then skips it). Run `python -m bench static --kernel peer_rpa_v3` with that venv's python. Its
kernel and util modules are loaded from the installed files (the package's `__init__` pulls in
vLLM); `get_tpu_version` (it reads `jax.devices()`, a CPU here) is set to the target's.

Its cache packs K and V per head like jax's (kv_cache [P, page_size, 2 Hkv / packing, packing,
D]: for bf16 the same bytes as jax's [P, page_size, 2 Hkv, D]). Its call also writes the new
tokens' K/V into the cache (k, v [T, Hkv, D] arguments), takes a flattened page table and a
`distribution` (decode / prefill / mixed sequence counts) instead of num_seqs, and runs one
pallas_call per case: the decode shapes go through the decode kernel (distribution (B, B, B)),
verify through the mixed one ((0, 0, B)). Block sizes: its defaults (`get_default_block_sizes`,
none of its tuned tables is consulted by the call), vmem_limit_bytes: its default (the chip's
whole VMEM). Grid (1,), "arbitrary": one TensorCore on v5p.

Its main loop is the loop over a (sequence, q block)'s KV blocks (`compute_with_bkv`): one
iteration waits for one bkv_sz-key block of every head (and starts the next one's page DMAs),
then runs the nested loop over its bkv_csz-key compute chunks.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys
import types

import numpy as np

from bench.kernels import require_peer, shape_finder
from bench.kernels import paged as paged_mod

KERNEL = "peer_rpa_v3"
_VERSION = {"v5e": 5, "v5p": 5, "v6e": 6}


def _load():
    """tpu-inference's RPA v3 kernel module (ModuleNotFoundError when not installed)."""
    full = "tpu_inference.kernels.ragged_paged_attention.v3.kernel"
    if full in sys.modules:
        return sys.modules[full]
    dist = importlib.metadata.distribution("tpu-inference")   # PackageNotFoundError if absent
    root = os.path.join(os.path.dirname(dist.locate_file("tpu_inference/__init__.py")),
                        "kernels", "ragged_paged_attention", "v3")
    parts = full.split(".")
    for i in range(1, len(parts) - 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    for leaf in ("util", "kernel"):
        name = ".".join(parts[:-1] + [leaf])
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, leaf + ".py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[full]


require_peer(_load, "tpu_inference")


def shapes() -> list:
    """Decode (the decode kernel) and verify (the mixed kernel) shapes with a bf16 cache; not
    the mixed batch (its fp8 caches take one static scale per tensor, not per head and token)."""
    return [s for s in paged_mod.bf16_shapes() if not s.mixed]


find = shape_finder(KERNEL, shapes)


def _case(shape):
    k = _load()
    return k.RpaCase.DECODE if shape.q_len == 1 else k.RpaCase.MIXED


def block_sizes(shape, chip: str) -> dict:
    """Its default (bq_sz, bkv_sz, bq_csz, bkv_csz) for the shape's case on `chip`."""
    import jax.numpy as jnp

    k = _load()
    k.get_tpu_version = lambda: _VERSION[chip]
    q_lens, _ = paged_mod.layout(shape)
    dt = jnp.dtype(shape.dtype)
    return k.get_default_block_sizes(dt, dt, shape.num_q_heads, shape.num_kv_heads,
                                     shape.head_dim, shape.page_size, sum(q_lens),
                                     shape.num_seqs, shape.pages_per_seq, case=_case(shape))


def call_name(shape, chip: str) -> str:
    b = block_sizes(shape, chip)
    return (f"RPA{_case(shape).symbol}-p_{shape.page_size}-bq_{b['bq_sz']}_{b['bq_csz']}"
            f"-bkv_{b['bkv_sz']}_{b['bkv_csz']}")


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)."""
    k = _load()
    k.get_tpu_version = lambda: _VERSION[chip]
    return functools.partial(k.ragged_paged_attention, sm_scale=shape.head_dim ** -0.5), \
        paged_mod.packed_args(shape)



def hbm_bytes(shape) -> int:
    return paged_mod.hbm_bytes(shape)


flops = paged_mod.flops


def main_loop(shape, *, chip: str = "v5p"):
    """The KV-block loop: one iteration moves bkv_sz keys of every head (K and V).

    Its two nested loops, in `--loops` order (checked on v5p at decode-b8 and verify16-b8,
    ctx 4096, p16, libtpu 0.0.50.1): the cache update of the new tokens' pages (17 bundles, one
    DMA; run in the block holding them: once per decode block, counted 0 for verify, where 3 of
    4 blocks skip it), then the compute loop over bkv_csz-key chunks (trips: the chunks of
    each block, averaged). Its forward branches (the next block's prefetch, and the guards) are
    counted as in the static span.
    """
    from bench.static import MainLoop

    b = block_sizes(shape, chip)
    q_lens, kv_lens = paged_mod.layout(shape)
    iterations = chunks = 0
    for q, kv in zip(q_lens, kv_lens):
        bq = 1 if q == 1 else b["bq_sz"]
        for i in range(-(-q // bq)):
            effective = kv if q == 1 else min(kv, kv - q + (i + 1) * bq)   # decode: no mask
            blocks = -(-effective // b["bkv_sz"])
            iterations += blocks
            for j in range(blocks):
                chunks += -(-min(effective - j * b["bkv_sz"], b["bkv_sz"]) // b["bkv_csz"])
    item = 2 if shape.dtype == "bfloat16" else np.dtype(shape.dtype).itemsize
    return MainLoop(
        call_name=call_name(shape, chip),
        bytes_per_iteration=2 * shape.num_kv_heads * b["bkv_sz"] * shape.head_dim * item,
        iterations=iterations,
        cores=1,
        inner_trips=(1 if shape.q_len == 1 else 0, max(1, round(chunks / iterations))),
    )
