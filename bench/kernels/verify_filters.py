"""Benchmark protocol of the filters' pass (`pallas_ops.verify.filter_kernel`, "verify_filters").

Shapes: the Qwen3 verify shape (B=64 bs=16 V=151936 bf16), every sequence sampling (T = 0.8)
under one filter setting: top-k 50, top-p 0.9, both, min-p 0.05 (their fast path), and top-p
0.9 on the fallback's path (flat rows: then the sampling kernel also samples above tau, its
cost is the verify_accept sampling row's).

- `build(shape, *, chip)`: the whole filtered `verify_accept` call (this pass, then the sampling
  kernel, whose fast-path sequences skip their compute); `hbm_bytes(shape)`: the two-read floor
  (2 x B x bs x V x itemsize), the limit the issue sets for a filtered row.
- `main_loop(shape, *, chip)`: this pass's grid loop; one iteration = one sequence (bs rows x the
  whole vocabulary in VMEM). The hot path is the fast path: the insertion sweep, the candidates'
  bisections and sample, the total-mass sweep for top-p without top-k; the fallback (bisection
  over every entry, for rows whose kept set leaves the 512 candidates) is declared skipped.
"""
from __future__ import annotations

import dataclasses

KERNEL = "verify_filters"
CALL_NAME = "verify_filters"


@dataclasses.dataclass(frozen=True)
class FilterShape:
    name: str
    batch: int
    block_size: int
    vocab: int
    dtype: str = "bfloat16"
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    fallback: bool = False   # declare the fallback's path (rows whose kept set leaves the
    #                          candidates: a flat distribution), not the fast path


SHAPES = [
    FilterShape("qwen3-b64-bs16-topk50", 64, 16, 151936, top_k=50),
    FilterShape("qwen3-b64-bs16-topp09", 64, 16, 151936, top_p=0.9),
    FilterShape("qwen3-b64-bs16-topk50-topp09", 64, 16, 151936, top_k=50, top_p=0.9),
    FilterShape("qwen3-b64-bs16-minp005", 64, 16, 151936, min_p=0.05),
    FilterShape("qwen3-b64-bs16-topp09-fallback", 64, 16, 151936, top_p=0.9, fallback=True),
    FilterShape("qwen3-b64-bs16-topp09-f32", 64, 16, 151936, dtype="float32", top_p=0.9),
]


def shapes() -> list:
    return list(SHAPES)


def find(name: str):
    return next(s for s in SHAPES if s.name == name)


def _itemsize(dtype: str) -> int:
    return {"bfloat16": 2, "float32": 4}[dtype]


def build(shape, *, chip: str = "v5p", interpret=False):
    """(fn, args): fn(logits, draft_tokens, seed) -> VerifyResult, T = 0.8 and the shape's
    filter for every sequence."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.verify import verify_accept

    B, bs, V = shape.batch, shape.block_size, shape.vocab
    S = jax.ShapeDtypeStruct

    def fn(logits, drafts, seed):
        return verify_accept(
            logits, drafts, temperature=jnp.full((B,), 0.8, jnp.float32), seed=seed,
            position=jnp.full((B,), 1000, jnp.int32),
            top_k=jnp.full((B,), shape.top_k, jnp.int32) if shape.top_k else None,
            top_p=jnp.full((B,), shape.top_p, jnp.float32) if shape.top_p < 1 else None,
            min_p=jnp.full((B,), shape.min_p, jnp.float32) if shape.min_p else None,
            interpret=interpret, chip=chip)

    return fn, (S((B, bs, V), jnp.dtype(shape.dtype)), S((B, bs - 1), jnp.int32),
                S((B,), jnp.int32))


def hbm_bytes(shape) -> int:
    """The compulsory bytes: the logits read once (issue 18 allowed a filtered row two reads;
    `bench static`'s limit is the physical one, one read)."""
    return shape.batch * shape.block_size * shape.vocab * _itemsize(shape.dtype)


def main_loop(shape, *, chip: str = "v5p"):
    from bench.static import MainLoop
    from pallas_ops.chips import CHIPS
    from pallas_ops.verify.filter_kernel import MASS_UNROLL, UNROLL

    B, bs, V = shape.batch, shape.block_size, shape.vocab
    nchunks = -(-V // 128)
    groups = nchunks // UNROLL - (1 if V % 128 and nchunks % UNROLL == 0 else 0)
    mass_groups = (nchunks - (1 if V % 128 else 0)) // MASS_UNROLL
    steps = 16 if shape.dtype == "bfloat16" else 32
    on_k, on_p = bool(shape.top_k), shape.top_p < 1
    p_alone = on_p and not on_k
    # Nested loops in schedule order (libtpu 0.0.50.1, `--loops`): the insertion sweep, the
    # candidates' top-k bisection (top-k only), the total-mass sweep (top-p without top-k), the
    # candidates' top-p bisection (top-p only), then the fallback's (not run on the fast path):
    # count bisection [its sweep], store sweep, mass bisection [its sweep]. Forward branches:
    # a pipeline branch around the step (runs), the unfiltered-sequence stores (skipped), the
    # filtered body (runs), the top-k bisection (skipped without top-k), the total-mass sweep
    # and its other side, the top-p bisection (skipped without top-p), the fallback (skipped
    # on the fast path), its top-k and top-p parts.
    fallback = (0, 0, 0, 0, 0)
    if shape.fallback:   # bisection over every entry: [its sweep], the store sweep, [its sweep]
        fallback = (steps if on_k else 0, groups, groups if on_p else 0, steps if on_p else 0,
                    groups)
    return MainLoop(
        call_name=CALL_NAME,
        bytes_per_iteration=bs * V * _itemsize(shape.dtype),
        iterations=B,
        cores=min(CHIPS[chip].tensorcores, B),
        loop_depth=1,
        inner_trips=(groups, steps if on_k else 0, mass_groups if p_alone else 0,
                     steps if on_p else 0) + fallback,
        taken_branches=(False, True, False, not on_k, not p_alone, p_alone, not on_p,
                        not shape.fallback, not (shape.fallback and on_k),
                        not (shape.fallback and on_p)),
    )


def concrete_args(shape, seed: int = 0):
    import jax
    import jax.numpy as jnp
    _, specs = build(shape)
    logits = jax.random.normal(jax.random.key(seed), specs[0].shape, specs[0].dtype) * 3
    drafts = jnp.argmax(logits[:, :-1], -1).astype(jnp.int32)
    return logits, drafts, jnp.arange(shape.batch, dtype=jnp.int32)
