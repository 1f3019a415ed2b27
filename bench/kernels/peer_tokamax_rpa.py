"""The peer: tokamax's batched ragged paged attention (bRPA), at the paged shapes.

Not a dependency of this project: it needs `pip install --no-deps tokamax==0.0.17` into a
separate venv beside jax >= 0.11 (the peers venv, `make peers`; this module fails to import
without it, and `bench static` then skips it). Run `python -m bench static --kernel
peer_tokamax_rpa` with that venv's python. `tokamax`'s package `__init__`s pull in qwix, xprof
and the autotuning machinery, so the kernel's own files (`tokamax/_src/ops/batched_rpa/kernel/`,
which import only jax) are loaded from the installed package under empty parent packages. Its
chip queries (`pltpu.get_tpu_info()`) read the abstract mesh that `pallas_ops.aot.lower_for_tpu`
(which `bench static` compiles through) sets up for the target chip, so nothing is patched.

The call is `tokamax.ops.batched_ragged_paged_attention` (the op's Mosaic TPU implementation,
`pallas_mosaic_tpu.PallasTpuBatchedRpa`), reproduced here without the op wrapper: its block
sizes are those the op gives its users on an autotuning-cache miss (tokamax 0.0.17 ships no
batched-RPA cache entry for any TPU): `_get_heuristics_config` (read from the installed file),
bkv_sz 512, n_buffer 3, decode batch 8 (bq = decode_query_size, bq_c 1), prefill/mixed bq 128,
bq_c 64, batch 2; vmem_limit_bytes: its default, the chip's whole VMEM (64 MiB on v5p). (The
kernel wrapper's own `calculate_block_sizes`, which the op overrides, is not used.)

Its cache, the default `KVLayout.HEAD_ALONG_SUBLANE`, packs K and V per head like RPA v3's
(kv_cache [P, page_size, 2 Hkv / packing, packing, D]: for bf16 the bytes of jax's
[P, page_size, 2 Hkv, D]); the call also writes the new tokens' K/V (k, v [T, Hkv, D]) into it
and takes a flattened page table and a `distribution` (cumulative decode / prefill / mixed
sequence counts). It runs, for each of its three cases (decode, prefill, mixed), a scheduler
pallas_call (`rpa_metadata_schedule`: the list of (sequence, q block, KV block) tasks of that
case's sequences, and their DMA descriptors) and the attention pallas_call, which does nothing
for a case without sequences. Decode: distribution (B, B, B) (the decode kernel); verify and the
mixed batch: the mixed case (0, 0, B) (its kernel takes every q length; verify sequences are
not decode ones at the call's default decode_query_size=1). Its speculative-decoding bucket
(decode_query_size=16: verify in the decode kernel at bq 16, bq_c 1) does not fit v5p's VMEM
with the op's decode blocks (libtpu 0.0.50.1: 86.8M used of 63.9M at verify16-b8-ctx4096-p16),
so it is not what a user of the defaults can run. The 8-bit-cache shapes are not run: tokamax
takes an fp8 cache only with per-tensor scales (static floats) or per-token scales in the
SEQ_ALONG_LANE layout, not the catalogue's per-(head, token) f32 scales.

Grid: none (one kernel instance), one TensorCore on v5p; inside it a loop over chunks of the
schedule (one chunk at these shapes) around `pltpu.emit_pipeline` over the schedule's steps.
Its main loop is that pipeline's step loop: one step gathers, for each of its `batch` task
slots, one bkv_sz-key block of every KV head (DMA'd per page, token-exact, from the tasks'
sequences: a step's slots hold consecutive tasks, across sequences), and its query block, then
computes all slots' online-softmax update at once (the decode kernel unrolls its bq / bq_c
query chunks).
"""
from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import os
import sys
import types

import numpy as np

from bench.kernels import require_peer, shape_finder
from bench import shapes as shapes_mod
from bench.kernels import paged as paged_mod

KERNEL = "peer_tokamax_rpa"
_PKG = "tokamax._src.ops.batched_rpa"


def _root() -> str:
    dist = importlib.metadata.distribution("tokamax")   # PackageNotFoundError if absent
    return os.path.dirname(str(dist.locate_file("tokamax/__init__.py")))


def _load():
    """tokamax's batched-RPA kernel `wrapper` module (ModuleNotFoundError when not installed)."""
    full = _PKG + ".kernel.wrapper"
    if full in sys.modules:
        return sys.modules[full]
    root = _root()
    parts = (_PKG + ".kernel").split(".")
    for i in range(1, len(parts) + 1):   # empty packages: their real __init__s pull in qwix
        name = ".".join(parts[:i])
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [os.path.join(root, *parts[1:i])]
            sys.modules[name] = mod
    kdir = os.path.join(root, "_src", "ops", "batched_rpa", "kernel")
    if not os.path.isfile(os.path.join(kdir, "wrapper.py")):
        raise ModuleNotFoundError(f"no batched_rpa kernel in {root}", name="tokamax")
    import importlib

    return importlib.import_module(full)


def heuristics_config() -> dict:
    """The op's `_get_heuristics_config` keyword arguments, read from the installed file."""
    path = os.path.join(_root(), "_src", "ops", "batched_rpa", "pallas_mosaic_tpu.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_get_heuristics_config":
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Config":
                    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    raise RuntimeError(f"no Config(...) in _get_heuristics_config of {path}")


require_peer(_load, "tokamax")


def shapes() -> list:
    """Decode, verify and the mixed batch, bf16 caches (not the 8-bit ones: see the docstring)."""
    return [s for s in shapes_mod.PAGED_ATTENTION if not s.cache_dtype]


find = shape_finder(KERNEL, shapes)


def decode_query_size(shape) -> int:
    """The call's default (1): only q_len-1 sequences are decode ones."""
    return 1


def distribution(shape) -> tuple[int, int, int]:
    """(decode, decode + prefill, all) sequence counts: verify and mixed in the mixed case."""
    s = shape.num_seqs
    return (s, s, s) if _is_decode(shape) else (0, 0, s)


def _is_decode(shape) -> bool:
    return not shape.mixed and shape.q_len == 1


def block_sizes(shape):
    """(decode, prefill) `configs.BlockSizes` as the op builds them from its heuristic config."""
    configs = sys.modules[_PKG + ".kernel.configs"]
    c = heuristics_config()
    decode = configs.BlockSizes(bq_sz=decode_query_size(shape), bq_c_sz=1, bkv_sz=c["bkv_sz"],
                                batch_size=c["decode_batch_size"], n_buffer=c["n_buffer"])
    prefill = configs.BlockSizes(bq_sz=c["prefill_bq_sz"], bq_c_sz=c["prefill_bq_c_sz"],
                                 bkv_sz=c["bkv_sz"], batch_size=c["prefill_batch_size"],
                                 n_buffer=c["n_buffer"])
    return decode, prefill


def _blocks(shape):
    """The BlockSizes of the attention call that does the shape's work."""
    decode, prefill = block_sizes(shape)
    return decode if _is_decode(shape) else prefill


def call_name(shape, chip: str = "v5p") -> str:
    """`kernel.get_kernel_name` for that call (HEAD_ALONG_SUBLANE, no sliding window)."""
    b = _blocks(shape)
    symbol = "d" if _is_decode(shape) else "m"
    return f"RPA{symbol}-nhs-p{shape.page_size}-b{b.batch_size}-q{b.bq_sz}-k{b.bkv_sz}"


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(q, k, v, kv_cache, kv_lens, page_indices, cu_q_lens, distribution)."""
    if shape.cache_dtype:
        raise ValueError(f"{KERNEL} runs the bf16-cache shapes only (see its docstring)")
    wrapper = _load()
    d = shape.head_dim
    args = paged_mod.packed_args(shape)      # the same arguments as RPA v3's
    decode, prefill = block_sizes(shape)
    fn = functools.partial(wrapper.ragged_paged_attention, sm_scale=d ** -0.5,
                           decode_block_sizes=decode, prefill_block_sizes=prefill,
                           decode_query_size=decode_query_size(shape))
    return fn, args


def hbm_bytes(shape) -> int:
    return paged_mod.hbm_bytes(shape)


flops = paged_mod.flops


def tasks(shape) -> list[int]:
    """Keys DMA'd per task of the working call, in schedule order (`schedule.py`'s seq / q / k
    loops: KV blocks up to the last one the q block sees causally; per page, token-exact)."""
    b = _blocks(shape)
    q_lens, kv_lens = paged_mod.layout(shape)
    out = []
    for q, kv in zip(q_lens, kv_lens):
        offset, num_k = kv - q, -(-kv // b.bkv_sz)
        for qi in range(-(-q // b.bq_sz)):
            q_sz = min(q - qi * b.bq_sz, b.bq_sz)
            end_k = min(num_k, (offset + qi * b.bq_sz + q_sz - 1) // b.bkv_sz + 1)
            out += [min(kv - k * b.bkv_sz, b.bkv_sz) for k in range(end_k)]
    return out


def main_loop(shape, *, chip: str = "v5p"):
    """The pipeline's step loop: one step moves its `batch` tasks' KV blocks (every head, K and
    V; bytes averaged over the steps, the last step's empty slots move nothing)."""
    from bench.static import MainLoop

    b = _blocks(shape)
    keys = tasks(shape)
    steps = -(-len(keys) // b.batch_size)
    item = 2 if shape.dtype == "bfloat16" else np.dtype(shape.dtype).itemsize
    per_key = 2 * shape.num_kv_heads * shape.head_dim * item
    # The two loops nested in it are the pipeline's lookahead fetches (`fetch_with_lookahead`,
    # q blocks then KV blocks): a while loop that starts the next steps' copies until every
    # buffer is in flight. Its prologue fetches n_buffer - 1 steps; each later step is fetched
    # by one trip of each loop in some step: trips per step averaged (1, or 0 when the prologue
    # covers every step).
    fetched = max(steps - (b.n_buffer - 1), 0)
    trips = round(fetched / steps)
    return MainLoop(
        call_name=call_name(shape, chip),
        bytes_per_iteration=round(sum(keys) * per_key / steps),
        iterations=steps,
        cores=1,
        inner_trips=(trips, trips),
    )
