"""Tensor and data parallelism on JAX's SPMD machinery: a `jax.sharding.Mesh` with axes "data"
and "model", `NamedSharding`s for weights and caches, and the step functions run per shard
inside `jax.shard_map`.

Layout over the `model` axis (n devices):
- attention: q heads split n ways (q_proj columns, o_proj rows); KV heads split n ways (k_proj /
  v_proj columns, the target's KV pages and the draft's context cache on their head axis). With
  fewer KV heads than devices (n % Hkv == 0), each KV head is REPLICATED on n / Hkv devices:
  k_proj / v_proj columns repeated head by head (`expand_kv_heads`) so the model runs with n KV
  heads, device j holding copy j of head j // (n / Hkv), next to the q heads that read it (its
  q heads j * Hq/n .. are all in that head's group). The caches then hold n heads: each KV
  head's bytes n / Hkv times over the mesh, one head per device.
- MLP: gate/up columns, down rows split n ways.
- one all-reduce (`jax.lax.psum` over "model") after o_proj and one after down_proj per layer.
- embedding rows and lm_head columns split on the vocabulary: the embedding is a masked local
  lookup plus a psum; logits stay on their vocabulary shard, and everything that reads them
  (the draft's argmax, `models.sampling.sample_tokens`, `verify_accept(vocab_axis_name=)`)
  exchanges only per-row partials.
- norms and the draft's fc replicated (they act on the full hidden state).

Over the `data` axis (d devices): slots split in d contiguous groups of max_batch / d, each
group with its own page pool (`PartitionedPageAllocator`: page ids local to the group), its own
rows of the draft's context cache and its own ragged batch; the host loop keeps one queue.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "model")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The mesh and what it means for a decoder (all sizes static)."""
    mesh: jax.sharding.Mesh
    data: int          # size of the "data" axis
    model: int         # size of the "model" axis
    target_kv_heads: int   # KV heads in the caches and k/v projections (replicated: = model)
    draft_kv_heads: int | None

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)


def check_mesh(mesh, target_cfg, draft_cfg=None, *, max_batch: int,
               num_pages: int | None = None) -> Layout:
    """Validate `mesh` for these models and sizes; ValueError naming the numbers otherwise."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if set(mesh.axis_names) != set(AXES) or len(mesh.axis_names) != 2:
        raise ValueError(f"mesh axes must be named {AXES} (either may have size 1), got "
                         f"{tuple(mesh.axis_names)}")
    d, n = int(mesh.shape["data"]), int(mesh.shape["model"])
    if max_batch % d:
        raise ValueError(f"max_batch={max_batch} is not divisible by the mesh's data axis ({d})")
    if num_pages is not None and num_pages % d:
        raise ValueError(f"num_pages={num_pages} is not divisible by the mesh's data axis ({d}): "
                         f"each data shard has its own page pool")
    kv = {"draft": None}
    for name, c in (("target", target_cfg), ("draft", draft_cfg)):
        if c is None:
            continue
        if c.num_heads % n:
            raise ValueError(f"{name}: {c.num_heads} attention heads are not divisible by the "
                             f"mesh's model axis ({n})")
        if c.num_kv_heads % n and n % c.num_kv_heads:
            raise ValueError(f"{name}: {c.num_kv_heads} KV heads and a model axis of {n}: the "
                             f"KV heads must split evenly (Hkv % n == 0) or be replicated evenly "
                             f"(n % Hkv == 0)")
        groups = (c.num_heads // n) // max(c.num_kv_heads // n, 1)
        if groups not in (1, 2, 4, 8):
            raise ValueError(f"{name}: {c.num_heads // n} q heads per device over "
                             f"{max(c.num_kv_heads // n, 1)} KV head(s): group {groups}, the "
                             f"kernels support groups 1, 2, 4, 8")
        if c.intermediate_size % n:
            raise ValueError(f"{name}: intermediate_size={c.intermediate_size} is not divisible "
                             f"by the mesh's model axis ({n})")
        kv[name] = max(c.num_kv_heads, n)
    if target_cfg.vocab_size % n:
        raise ValueError(f"vocab_size={target_cfg.vocab_size} is not divisible by the mesh's "
                         f"model axis ({n}): the embedding and lm_head are split on it")
    return Layout(mesh, d, n, kv["target"], kv["draft"])


# ------------------------------------------------------------------------------------------------
# weights


def _names(path) -> list[str]:
    """The keys of a path in a model's nnx state, as strings."""
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def _param_spec(path) -> P:
    """The PartitionSpec of a parameter from its path in the model's nnx state."""
    names = _names(path)
    if "embed_tokens" in names:
        return P("model", None)                      # [V, H]: vocabulary rows
    if "lm_head" in names:
        return P(None, "model")                      # [H, V]: vocabulary columns
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        if proj in names:
            return P(None, "model")                  # [H, out]: output columns
    for proj in ("o_proj", "down_proj"):
        if proj in names:
            return P("model", None)                  # [in, H]: input rows
    return P()                                       # norms, the draft's fc: replicated


def expand_kv_heads(kernel, num_kv_heads: int, heads: int, head_dim: int):
    """k_proj / v_proj kernel [H, Hkv * D] -> [H, heads * D]: each KV head's D columns repeated
    heads / Hkv times in place (head 0's copies first), for KV-head replication."""
    if heads == num_kv_heads:
        return kernel
    r = heads // num_kv_heads
    k = kernel.reshape(kernel.shape[0], num_kv_heads, 1, head_dim)
    k = jnp.broadcast_to(k, (kernel.shape[0], num_kv_heads, r, head_dim))
    return k.reshape(kernel.shape[0], heads * head_dim)


def _put(x, sharding):
    """device_put, or for a jax.ShapeDtypeStruct (abstract decoders, AOT) the same struct
    carrying the sharding."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.device_put(x, sharding)


def shard_state(state, cfg, heads: int, layout: Layout):
    """A model's nnx state placed on the mesh: (KV projections replicated to `heads` heads if
    needed) each array device_put with its NamedSharding (ShapeDtypeStructs: given the
    sharding). Returns (state, specs)."""
    def place(path, x):
        names = _names(path)
        if ("k_proj" in names or "v_proj" in names) and heads != cfg.num_kv_heads:
            expand = lambda a: expand_kv_heads(a, cfg.num_kv_heads, heads, cfg.head_dim)  # noqa
            x = jax.eval_shape(expand, x) if isinstance(x, jax.ShapeDtypeStruct) else expand(x)
        return _put(x, layout.sharding(_param_spec(path)))
    placed = jax.tree_util.tree_map_with_path(place, state)
    specs = jax.tree_util.tree_map_with_path(lambda p, _: _param_spec(p), state)
    return placed, specs


# ------------------------------------------------------------------------------------------------
# caches


def paged_cache_spec(cache):
    """Target layer caches [Hkv, P, ps, D] (scales [Hkv, P, ps]): heads over model, pages over
    data."""
    return jax.tree.map(lambda _: P("model", "data"), cache)


def context_cache_spec(cache):
    """Draft layer caches [B, Hkv, S, D] (scales [B, Hkv, S]): rows over data, heads over model."""
    return jax.tree.map(lambda _: P("data", "model"), cache)


def place(tree, spec_tree, layout: Layout):
    """Every array of `tree` on the mesh with its PartitionSpec (ShapeDtypeStructs: given it)."""
    return jax.tree.map(lambda x, s: _put(x, layout.sharding(s)), tree, spec_tree)

