"""Checkpoint loading: tiny checkpoints written here in Hugging Face (target) and z-lab (draft)
naming load back into models that reproduce the in-memory models' outputs exactly; a missing or
misshapen tensor raises an error naming it (and the expected shape)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.flax
from flax import nnx
from safetensors import safe_open

from models.config import RopeScaling
from models.draft import DraftModel
from models.loading import (CheckpointError, draft_tensor_names, load_draft, load_target,
                            save_checkpoint, target_tensor_names)
from models.target import TargetModel
from models.testing import perturb_norms, tiny_draft_config, tiny_target_config

LLAMA = tiny_target_config(model_type="llama", qk_norm=False, tie_word_embeddings=False,
                           num_layers=2, rope_theta=500000.0,
                           rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))
QWEN = tiny_target_config(tie_word_embeddings=True, num_layers=2)


def _read(path):
    out = {}
    with safe_open(str(path / "model.safetensors"), framework="flax") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


@nnx.jit
def _outputs(target, draft, tokens):
    h, feats = target.dense_forward(tokens, feature_layers=draft.config.target_layer_ids)
    blk = target.embed(jnp.full((tokens.shape[0], 4), draft.config.mask_token_id))
    return target.logits(h), target.logits(draft.dense_forward(feats, blk, tokens.shape[1]))


@pytest.mark.parametrize("cfg", [LLAMA, QWEN], ids=["llama3", "qwen3-tied"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_reproduces_outputs_exactly(tmp_path, cfg, dtype):
    target = perturb_norms(TargetModel(cfg, dtype=dtype, rngs=nnx.Rngs(3)), seed=4)
    draft = perturb_norms(DraftModel(tiny_draft_config(cfg), dtype=dtype, rngs=nnx.Rngs(5)),
                          seed=6)
    save_checkpoint(target, tmp_path / "t")
    save_checkpoint(draft, tmp_path / "d")
    names = set(_read(tmp_path / "t"))
    assert "model.layers.1.self_attn.o_proj.weight" in names
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == cfg.qk_norm
    dnames = set(_read(tmp_path / "d"))
    assert {"fc.weight", "hidden_norm.weight", "norm.weight",
            "layers.1.self_attn.k_norm.weight"} <= dnames
    assert not any("embed" in n or "lm_head" in n for n in dnames)
    t2, d2 = load_target(tmp_path / "t"), load_draft(tmp_path / "d")
    assert t2.config == target.config and d2.config == draft.config
    assert t2.dtype == jnp.dtype(dtype)
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]], jnp.int32)
    for a, b in zip(_outputs(target, draft, tokens), _outputs(t2, d2, tokens)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hf_layout_is_out_by_in(tmp_path):
    """HF stores Linear weights [out, in]: q_proj is [Hq*D, H], fc is [H, n_feat*H]."""
    target = TargetModel(LLAMA, rngs=nnx.Rngs(0))
    draft = DraftModel(tiny_draft_config(LLAMA), rngs=nnx.Rngs(1))
    save_checkpoint(target, tmp_path / "t")
    save_checkpoint(draft, tmp_path / "d")
    t = _read(tmp_path / "t")
    assert t["model.layers.0.self_attn.q_proj.weight"].shape == (
        LLAMA.num_heads * LLAMA.head_dim, LLAMA.hidden_size)
    assert t["model.layers.0.mlp.down_proj.weight"].shape == (
        LLAMA.hidden_size, LLAMA.intermediate_size)
    assert t["model.embed_tokens.weight"].shape == (LLAMA.vocab_size, LLAMA.hidden_size)
    assert t["lm_head.weight"].shape == (LLAMA.vocab_size, LLAMA.hidden_size)
    d = _read(tmp_path / "d")
    assert d["fc.weight"].shape == (LLAMA.hidden_size, 2 * LLAMA.hidden_size)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["dflash_config"]["mask_token_id"] == LLAMA.vocab_size - 1
    assert len(target_tensor_names(LLAMA)) == len(t)
    assert len(draft_tensor_names(draft.config)) == len(d)


def _rewrite(path, fn):
    tensors = fn(_read(path))
    safetensors.flax.save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    save_checkpoint(TargetModel(LLAMA, rngs=nnx.Rngs(0)), tmp_path / "t")
    _rewrite(tmp_path / "t", lambda t: {k: v for k, v in t.items()
                                        if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*"
                                              r"\[128, 64\]"):
        load_target(tmp_path / "t")


def test_wrong_shape_is_named(tmp_path):
    save_checkpoint(DraftModel(tiny_draft_config(QWEN), rngs=nnx.Rngs(0)), tmp_path / "d")

    def shrink(t):
        t["layers.0.self_attn.k_proj.weight"] = t["layers.0.self_attn.k_proj.weight"][:32]
        return t
    _rewrite(tmp_path / "d", shrink)
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.k_proj\.weight.*"
                                              r"\[32, 64\].*expected \[64, 64\]"):
        load_draft(tmp_path / "d")


def test_unknown_draft_tensors_are_refused(tmp_path):
    """E.g. a DFlash2 checkpoint (per-layer convolutions, candidate selector) is not this model."""
    save_checkpoint(DraftModel(tiny_draft_config(QWEN), rngs=nnx.Rngs(0)), tmp_path / "d")

    def add(t):
        t["layers.0.attention_conv.base_kernel"] = jnp.zeros((2, 2, 64))
        return t
    _rewrite(tmp_path / "d", add)
    with pytest.raises(CheckpointError, match="attention_conv"):
        load_draft(tmp_path / "d")


def test_sharded_checkpoint_and_dtype_override(tmp_path):
    target = TargetModel(QWEN, rngs=nnx.Rngs(0))
    save_checkpoint(target, tmp_path / "t")
    t = _read(tmp_path / "t")
    keys = sorted(t)
    (tmp_path / "t" / "model.safetensors").unlink()
    safetensors.flax.save_file({k: t[k] for k in keys[:5]},
                               str(tmp_path / "t" / "model-00001-of-00002.safetensors"))
    safetensors.flax.save_file({k: t[k] for k in keys[5:]},
                               str(tmp_path / "t" / "model-00002-of-00002.safetensors"))
    t2 = load_target(tmp_path / "t", dtype=jnp.bfloat16)
    assert t2.dtype == jnp.bfloat16
    assert t2.embed_tokens[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(t2.embed_tokens[...]),
                                  np.asarray(target.embed_tokens[...].astype(jnp.bfloat16)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((tmp_path / "t" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_target(empty)
