"""Ahead-of-time lowering of the decoders' step functions at real model sizes, nothing allocated.

    target, draft = abstract_models(target_cfg, draft_cfg, dtype=jnp.bfloat16)
    dec = SpeculativeDecoder(target, draft, max_batch=8, max_seq_len=4096, mesh=mesh,
                             abstract=True)
    lowered = lower_step(dec, chip="v5p")         # the sharded speculative step
    compiled = lowered.compile()

Weights, caches and host inputs are `jax.ShapeDtypeStruct`s carrying their `NamedSharding`s over
`mesh` (a mesh of a TPU topology's devices, `pallas_ops.aot.tpu_mesh`, works from any host with
libtpu installed). The Pallas kernels are lowered for `chip` (compiled by Mosaic, not
interpreted).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models.ops import get_ops


def abstract_models(target_cfg, draft_cfg=None, *, dtype=jnp.bfloat16):
    """(target, draft or None) as abstract nnx models: parameters are ShapeDtypeStructs."""
    from models.draft import DraftModel
    from models.target import TargetModel

    target = nnx.eval_shape(lambda: TargetModel(target_cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    draft = (nnx.eval_shape(lambda: DraftModel(draft_cfg, dtype=dtype, rngs=nnx.Rngs(1)))
             if draft_cfg is not None else None)
    return target, draft


def _host(dec, shape, dtype):
    """A per-slot (or per-group) host input: split over the data axis when there is a mesh."""
    sharding = NamedSharding(dec.layout.mesh, P("data")) if dec.layout else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def step_args(dec):
    """The abstract arguments of `dec`'s decode step (speculative or autoregressive)."""
    B, pps, G = dec.max_batch, dec.pages_per_seq, dec.groups
    i32, f32 = jnp.int32, jnp.float32
    common = dict(last=_host(dec, (B,), i32), lens=_host(dec, (B,), i32),
                  order=_host(dec, (B,), i32), num_seqs=_host(dec, (G,), i32),
                  page_idx=_host(dec, (B, pps), i32), temp=_host(dec, (B,), f32),
                  seeds=_host(dec, (B,), i32))
    c = common
    filt = (_host(dec, (B,), i32), _host(dec, (B,), f32), _host(dec, (B,), f32))  # top-k/p, min-p
    if dec.has_draft:
        return (dec._st, dec.target_cache, dec._sd, dec.draft_cache, c["last"], c["lens"],
                _host(dec, (B,), jnp.bool_), c["order"], c["num_seqs"], c["page_idx"], c["temp"],
                c["seeds"], _host(dec, (B, dec.block_size - 1), i32), filt)
    return (dec._st, dec.target_cache, c["last"], c["lens"], c["order"], c["num_seqs"],
            c["page_idx"], c["temp"], c["seeds"], filt)


def lower_step(dec, *, chip: str | None = "v5p", greedy: bool = True):
    """`jax.jit(step).lower(...)` of `dec`'s decode step: for a speculative decoder the whole
    step (draft + target verify of the block + verify/accept + commit to the draft context), for
    an autoregressive one the one-token step. chip: lower the Pallas kernels for this TPU
    generation (compiled, not interpreted; `dec.backend` must be "pallas"); None keeps the
    decoder's ops (e.g. the xla twins)."""
    if chip is not None:
        if dec.backend != "pallas":
            raise ValueError(f"chip={chip!r} lowers the Pallas kernels: build the decoder with "
                             f"backend='pallas' (got {dec.backend!r})")
        dec.ops = get_ops("pallas", chip=chip, interpret=False,
                          model_axis=dec.model_axis)
    fn = (dec._step_fn(greedy, False, draft_sampling=dec.draft_sampling and not greedy)
          if dec.has_draft else dec._step_fn())
    donate = (1, 3) if dec.has_draft else (1,)
    args = step_args(dec)
    if dec.layout is None:
        return jax.jit(fn, donate_argnums=donate).lower(*args)
    with jax.sharding.use_abstract_mesh(dec.layout.mesh.abstract_mesh):
        return jax.jit(fn, donate_argnums=donate).lower(*args)


def weights_per_device(dec) -> int:
    """Bytes of target + draft weights one device holds (from the shardings)."""
    total = 0
    trees = [dec._st] + ([dec._sd] if dec.has_draft else [])
    for leaf in jax.tree.leaves(trees):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total
