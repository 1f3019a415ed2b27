"""The peer of verify_accept: vLLM tpu-inference's `RejectionSampler`, at the verify/accept shapes.

Not a dependency of this project: it needs `pip install --no-deps tpu-inference==0.32.0` beside
jax >= 0.11 (this module raises ModuleNotFoundError without it, and `bench static` skips it).

What runs: one speculative step's token selection as tpu-inference's TPU runner does it
(`runner/tpu_runner.py`, the spec-decode branch of its sampling step) for B requests of one
DFlash block of bs tokens: the bonus token of each request sampled by its `sample()`
(`layers/jax/sample/sampling.py`) from the request's last row of logits, then
`RejectionSampler(mesh)(draft_token_ids, num_draft_tokens, draft_probs=None, target_logits,
bonus_token_ids, sampling_metadata, key)` over the bs - 1 draft rows
(`layers/jax/sample/rejection_sampler.py`; draft_probs=None is what its DFlash path passes).
Its logits arrive flattened as two arrays, target_logits [B*(bs-1), V] and bonus_logits [B, V]
(bf16): the runner cuts them from the model's [B*bs, V] logits with two row gathers
(`_select_from_array_fn`), not counted here. Greedy shapes: do_sampling=False (its greedy
path: argmax, first mismatch by segment_min; temperature/top_k/top_p are None). Sampling
shapes: temperature 0.8 per request, top_k 0 and top_p 1.0 (no filter; it still runs its
top-k and top-p masks and selects their results away with `where`), its own RNG (a typed
threefry key, split into bonus and rejection keys as the runner does). The sampling metadata
carries the runner's `_cache_collision_dummy` (int32[2], no logprobs). The whole program is
plain jnp (no pallas_call), so `WHOLE_PROGRAM = True` and there is no main_loop:
`bench static` reads XLA's cost analysis of the compiled program. Its sampling path's top-k
and top-p masks are 31-step binary searches (`lax.fori_loop`) over the [B*(bs-1), V] f32
probabilities; the cost analysis appears to count each while body once (qwen3-b64-bs16-sampling:
8.3 GB accessed, while one pass over those probabilities is 0.58 GB), so it is a lower bound
there.

It runs under `jax.shard_map` over its mesh: here one v5p device, axes ("data", "model") of
size 1 (tpu-inference's default 2-D axis names; its ShardingAxisName resolves ATTN_DATA to
"data", MLP_TENSOR to "model", so `sample` takes its distributed-candidates branch under a
`lax.cond` whose full-vocabulary fallback is what runs at top_k 0; both are compiled).

Loading: its package `__init__` imports vLLM, so the modules are executed from the installed
files by path: binary_search.py and envs.py as they are (light); sharding.py,
sampling_metadata.py, compiler_options.py, sampling.py and rejection_sampler.py as they are,
with what they import but do not use at trace time stubbed in `sys.modules` for the duration
of their execution only: `tpu_inference.utils` (torch, vLLM), `tpu_inference.logger`
(vLLM's logger -> `logging.getLogger`), `tpu_inference.runner.input_batch` (`InputBatch`, a
type annotation), `vllm.config.model.PROCESSED_LOGPROBS_MODES` and
`vllm.v1.outputs.LogprobsTensors` (logprobs only, off here).
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import types

from bench.kernels import require_peer, shape_finder
from bench import shapes as shapes_mod
from bench.kernels import verify as verify_mod

KERNEL = "peer_tpu_sampler"
WHOLE_PROGRAM = True

_PKG = "tpu_inference"


def _root() -> str:
    dist = importlib.metadata.distribution("tpu-inference")   # PackageNotFoundError if absent
    return os.path.dirname(dist.locate_file("tpu_inference/__init__.py"))


def _package(name: str) -> types.ModuleType:
    """sys.modules[name], created empty (with its parents) if absent."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        full = ".".join(parts[:i])
        if full not in sys.modules:
            sys.modules[full] = types.ModuleType(full)
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[full])
    return sys.modules[name]


@contextlib.contextmanager
def _stubbed(stubs: dict):
    """Install stub modules {name: {attr: value}} for names not already importable; remove
    the ones installed afterwards (the loaded module keeps what it imported from them)."""
    added = []
    for name, attrs in stubs.items():
        if name in sys.modules:
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            full = ".".join(parts[:i])
            if full not in sys.modules:
                sys.modules[full] = types.ModuleType(full)
                added.append(full)
                if i > 1:
                    setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1],
                            sys.modules[full])
        for k, v in attrs.items():
            setattr(sys.modules[name], k, v)
    try:
        yield
    finally:
        for full in reversed(added):
            sys.modules.pop(full, None)
            parent, _, leaf = full.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], leaf, None) is not None:
                with contextlib.suppress(AttributeError):
                    delattr(sys.modules[parent], leaf)


def _exec(name: str, relpath: str):
    """Execute the installed file `relpath` as module `name` (once)."""
    if name in sys.modules and getattr(sys.modules[name], "__file__", None):
        return sys.modules[name]
    parent, _, leaf = name.rpartition(".")
    _package(parent)
    spec = importlib.util.spec_from_file_location(name, os.path.join(_root(), relpath))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    setattr(sys.modules[parent], leaf, mod)
    return mod


class _InputBatch:   # a type annotation of sampling_metadata.py
    pass


def _load():
    """(rejection_sampler module, sampling module) from the installed files."""
    full = f"{_PKG}.layers.jax.sample.rejection_sampler"
    if full in sys.modules and getattr(sys.modules[full], "__file__", None):
        return sys.modules[full], sys.modules[f"{_PKG}.layers.jax.sample.sampling"]
    _root()
    logger = {"init_logger": logging.getLogger}
    _exec(f"{_PKG}.envs", "envs.py")
    _exec(f"{_PKG}.layers.common.binary_search", "layers/common/binary_search.py")
    with _stubbed({f"{_PKG}.utils": {}, f"{_PKG}.logger": logger}):
        _exec(f"{_PKG}.layers.common.sharding", "layers/common/sharding.py")
        _exec(f"{_PKG}.models.common.compiler_options", "models/common/compiler_options.py")
    with _stubbed({f"{_PKG}.utils": {"device_array": None},
                   f"{_PKG}.runner.input_batch": {"InputBatch": _InputBatch}}):
        _exec(f"{_PKG}.layers.jax.sample.sampling_metadata",
              "layers/jax/sample/sampling_metadata.py")
    with _stubbed({"vllm.config.model": {"PROCESSED_LOGPROBS_MODES": ("processed_logprobs",
                                                                      "processed_logits")},
                   "vllm.v1.outputs": {"LogprobsTensors": None}}):
        sampling = _exec(f"{_PKG}.layers.jax.sample.sampling", "layers/jax/sample/sampling.py")
    rs = _exec(full, "layers/jax/sample/rejection_sampler.py")
    return rs, sampling


require_peer(_load, "tpu_inference")


def shapes() -> list:
    """The verify/accept catalogue shapes (the same names as verify_accept's)."""
    return list(shapes_mod.VERIFY_ACCEPT)


find = shape_finder(KERNEL, shapes)


def mesh(chip: str = "v5p"):
    """A one-device mesh of the `chip` topology's first device, axes ("data", "model")."""
    import jax
    import numpy as np

    from pallas_ops.aot import tpu_device

    return jax.sharding.Mesh(np.array([tpu_device(chip)]).reshape(1, 1), ("data", "model"))


def build(shape, *, chip: str = "v5p"):
    """(fn, args): fn(target_logits [B*(bs-1), V], bonus_logits [B, V], draft_token_ids
    [B*(bs-1)], num_draft_tokens [B], cache_collision_dummy [2], key[, temperature, top_k,
    top_p]) -> output token ids [B*(bs-1) + B] (rejected: -1), as its runner's step does."""
    import jax
    import jax.numpy as jnp

    rs, sampling = _load()
    md_mod = sys.modules[f"{_PKG}.layers.jax.sample.sampling_metadata"]
    Metadata = md_mod.TPUSupportedSamplingMetadata
    m = mesh(chip)
    sampler = rs.RejectionSampler(m)
    # `sample` is its own top-level jit in the runner, with compiler options (SparseCore
    # all-gather offload off: no collective on one device); nested here, its Python function.
    sample = sampling.sample.__wrapped__
    B, bs, V = shape.batch, shape.block_size, shape.vocab
    n = B * (bs - 1)
    dt = jnp.dtype(shape.dtype)
    S = jax.ShapeDtypeStruct
    key_dtype = jax.random.key(0).dtype
    args = [S((n, V), dt), S((B, V), dt), S((n,), jnp.int32), S((B,), jnp.int32),
            S((2,), jnp.int32), S((), key_dtype)]
    if shape.sampling:
        args += [S((B,), jnp.float32), S((B,), jnp.int32), S((B,), jnp.float32)]

    def step(*a):
        # compile_for_tpu traces under an abstract mesh of its own (axis "x"); its shard_map
        # wants its own mesh as the context mesh.
        with jax.sharding.use_abstract_mesh(m.abstract_mesh):
            return _step(*a)

    def _step(target_logits, bonus_logits, draft_token_ids, num_draft_tokens, dummy, key,
             temperature=None, top_k=None, top_p=None):
        md = Metadata(temperature=temperature, top_k=top_k, top_p=top_p,
                      _cache_collision_dummy=dummy, do_sampling=shape.sampling,
                      logprobs=False)
        if shape.sampling:
            bonus_rng, rejection_rng = jax.random.split(key)
        else:
            bonus_rng = rejection_rng = key
        bonus_token_ids, _ = sample(bonus_rng, m, bonus_logits, md,
                                    allow_distributed_sampling=True)
        return sampler(draft_token_ids=draft_token_ids, num_draft_tokens=num_draft_tokens,
                       draft_probs=None, target_logits=target_logits,
                       bonus_token_ids=bonus_token_ids, sampling_metadata=md,
                       key=rejection_rng)

    return step, tuple(args)


def hbm_bytes(shape) -> int:
    """verify_accept's compulsory bytes (the B x bs x V logits read once)."""
    return verify_mod.hbm_bytes(shape)


def concrete_args(shape, seed: int = 0):
    """Random logits (normal x 3), drafts equal to their argmax (every draft accepted), bs - 1
    drafts per request; sampling: temperature 0.8, top_k 0, top_p 1.0."""
    import jax
    import jax.numpy as jnp

    _, specs = build(shape)
    B, bs = shape.batch, shape.block_size
    k = jax.random.key(seed)
    target = jax.random.normal(k, specs[0].shape, specs[0].dtype) * 3
    bonus = jax.random.normal(jax.random.fold_in(k, 1), specs[1].shape, specs[1].dtype) * 3
    out = (target, bonus, jnp.argmax(target, -1).astype(jnp.int32),
           jnp.full((B,), bs - 1, jnp.int32), jnp.zeros((2,), jnp.int32),
           jax.random.fold_in(k, 2))
    if shape.sampling:
        out += (jnp.full((B,), 0.8, jnp.float32), jnp.zeros((B,), jnp.int32),
                jnp.ones((B,), jnp.float32))
    return out
