"""Checkpoint loading and saving (safetensors).

Targets use Hugging Face naming (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj
.weight`, ..., `model.norm.weight`, `lm_head.weight` unless tied); DFlash drafts use z-lab's naming
(`fc.weight`, `hidden_norm.weight`, `layers.{i}....`, `norm.weight`; no embedding or lm_head: the
draft shares the target's). Linear weights are stored `[out, in]` and transposed into the models'
`[in, out]` kernels. A checkpoint directory holds `config.json` and one or more `*.safetensors`
files (an index file is not needed: every shard is scanned). bf16 and f32 checkpoints load; by
default parameters keep the checkpoint's dtype.

Errors name the tensor: a missing tensor, a tensor with the wrong shape (with the expected
shape), and, for drafts, tensors this implementation does not know (e.g. DFlash2 extras).
"""
from __future__ import annotations

import glob
import json
import os

import jax.numpy as jnp
from flax import nnx

from models.config import (DraftConfig, TargetConfig, load_draft_config, load_target_config,
                           to_hf_dict)
from models.draft import DraftModel
from models.target import TargetModel


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes."""


def _layer_names(prefix, layer, qk_norm):
    """(checkpoint name, attribute path, transpose) for one decoder layer."""
    out = [(f"{prefix}input_layernorm.weight", ("input_layernorm", "weight"), False),
           (f"{prefix}post_attention_layernorm.weight", ("post_attention_layernorm", "weight"),
            False)]
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
        out.append((f"{prefix}self_attn.{p}.weight", ("self_attn", p, "kernel"), True))
    if qk_norm:
        for p in ("q_norm", "k_norm"):
            out.append((f"{prefix}self_attn.{p}.weight", ("self_attn", p, "weight"), False))
    for p in ("gate_proj", "up_proj", "down_proj"):
        out.append((f"{prefix}mlp.{p}.weight", ("mlp", p, "kernel"), True))
    return [(name, ("layers", layer) + path, t) for name, path, t in out]


def target_tensor_names(cfg: TargetConfig):
    """[(HF name, attribute path in TargetModel, transpose)] for every target parameter."""
    names = [("model.embed_tokens.weight", ("embed_tokens",), False),
             ("model.norm.weight", ("norm", "weight"), False)]
    for i in range(cfg.num_layers):
        names += _layer_names(f"model.layers.{i}.", i, cfg.qk_norm)
    if not cfg.tie_word_embeddings:
        names.append(("lm_head.weight", ("lm_head",), True))
    return names


def draft_tensor_names(cfg: DraftConfig):
    """[(z-lab name, attribute path in DraftModel, transpose)] for every draft parameter."""
    names = [("fc.weight", ("fc", "kernel"), True),
             ("hidden_norm.weight", ("hidden_norm", "weight"), False),
             ("norm.weight", ("norm", "weight"), False)]
    for i in range(cfg.num_layers):
        names += _layer_names(f"layers.{i}.", i, True)
    return names


def _get(module, path):
    obj = module
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


def _open_tensors(directory):
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(os.fspath(directory), "*.safetensors")))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    where = {}
    for f in files:
        with safe_open(f, framework="flax") as h:
            for k in h.keys():
                where[k] = f
    return where


def _fill(model, names, directory, dtype, *, strict_extra: bool, what: str):
    from safetensors import safe_open

    where = _open_tensors(directory)
    expected = {n for n, _, _ in names}
    if strict_extra:
        extra = sorted(k for k in where if k not in expected)
        if extra:
            raise CheckpointError(f"{what} checkpoint {directory} has tensors this model does not "
                                  f"define: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    handles = {}
    try:
        for name, path, transpose in names:
            param = _get(model, path)
            want = tuple(param.get_value().shape)
            ckpt_shape = want[::-1] if transpose else want
            if name not in where:
                raise CheckpointError(f"{what} checkpoint {directory} lacks tensor {name!r} "
                                      f"(expected shape {list(ckpt_shape)})")
            f = where[name]
            if f not in handles:
                handles[f] = safe_open(f, framework="flax").__enter__()
            got = tuple(handles[f].get_slice(name).get_shape())
            if got != ckpt_shape:
                raise CheckpointError(f"{what} tensor {name!r} has shape {list(got)}, expected "
                                      f"{list(ckpt_shape)}")
            arr = handles[f].get_tensor(name)
            if transpose:
                arr = arr.T
            param.set_value(jnp.asarray(arr, dtype or arr.dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return model


def _ckpt_dtype(directory):
    from safetensors import safe_open

    where = _open_tensors(directory)
    name, f = next(iter(sorted(where.items())))
    with safe_open(f, framework="flax") as h:
        return h.get_tensor(name).dtype


def load_target(directory, *, dtype=None) -> TargetModel:
    """A `TargetModel` from a Hugging Face Llama-3.x / Qwen3 checkpoint directory."""
    cfg = load_target_config(directory)
    dtype = jnp.dtype(dtype) if dtype is not None else _ckpt_dtype(directory)
    model = nnx.eval_shape(lambda: TargetModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return _fill(model, target_tensor_names(cfg), directory, dtype, strict_extra=False,
                 what="target")


def load_draft(directory, *, dtype=None) -> DraftModel:
    """A `DraftModel` from a z-lab DFlash draft checkpoint directory."""
    cfg = load_draft_config(directory)
    dtype = jnp.dtype(dtype) if dtype is not None else _ckpt_dtype(directory)
    model = nnx.eval_shape(lambda: DraftModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return _fill(model, draft_tensor_names(cfg), directory, dtype, strict_extra=True,
                 what="draft")


def save_checkpoint(model: TargetModel | DraftModel, directory, *, dtype=None) -> None:
    """Write `config.json` + `model.safetensors` in HF (target) / z-lab (draft) naming."""
    import safetensors.flax

    os.makedirs(directory, exist_ok=True)
    cfg = model.config
    names = (target_tensor_names(cfg) if isinstance(model, TargetModel)
             else draft_tensor_names(cfg))
    tensors = {}
    for name, path, transpose in names:
        arr = _get(model, path).get_value()
        arr = arr.T if transpose else arr
        tensors[name] = jnp.asarray(arr, dtype or arr.dtype)
    safetensors.flax.save_file(tensors, os.path.join(directory, "model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(to_hf_dict(cfg), f, indent=2)
