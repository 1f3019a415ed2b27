"""Configs from Hugging Face / z-lab config.json, the layers' math, the host page allocator."""
from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from models.config import (check_draft_fits_target, default_target_layer_ids,
                           draft_config_from_dict, load_draft_config, load_target_config,
                           target_config_from_dict, to_hf_dict)
from models.layers import apply_rope, rms_norm, rope_inv_freq
from models.page_allocator import OutOfPages, PageAllocator

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "torch_dtype": "bfloat16",
}
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None,
    "tie_word_embeddings": False, "attention_bias": False, "max_position_embeddings": 40960,
}
QWEN3_8B_DFLASH = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
    "num_hidden_layers": 5, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000, "attention_bias": False,
    "block_size": 16, "num_target_layers": 36,
    "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
}


def test_llama31_config():
    c = target_config_from_dict(LLAMA31_8B)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert not c.qk_norm and not c.tie_word_embeddings and c.rope_theta == 500000.0
    assert c.rope_scaling.factor == 8.0 and c.rope_scaling.original_max_position_embeddings == 8192


def test_llama3_rope_scaling_bands():
    c = target_config_from_dict(LLAMA31_8B)
    plain = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, c.rope_scaling)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4.0           # short wavelengths: untouched
    low = wavelen > 8192 / 1.0            # long wavelengths: divided by the factor
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-12)
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-12)
    mid = ~high & ~low
    smooth = (8192 / wavelen[mid] - 1.0) / (4.0 - 1.0)
    np.testing.assert_allclose(scaled[mid], (1 - smooth) * plain[mid] / 8 + smooth * plain[mid],
                               rtol=1e-12)
    assert plain[0] == 1.0 and np.isclose(plain[1], 500000.0 ** (-2 / 128))


def test_qwen3_config_and_rope_parameters_form():
    c = target_config_from_dict(QWEN3_8B)
    assert c.qk_norm and c.head_dim == 128 and c.rope_scaling is None and c.rope_theta == 1e6
    d = dict(QWEN3_8B, tie_word_embeddings=True)
    del d["rope_theta"]
    d["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    c2 = target_config_from_dict(d)
    assert c2.tie_word_embeddings and c2.rope_theta == 5e5


def test_zlab_draft_config_and_default_layer_ids():
    d = draft_config_from_dict(QWEN3_8B_DFLASH)
    assert d.block_size == 16 and d.mask_token_id == 151669
    assert d.target_layer_ids == (1, 9, 17, 25, 33) and d.num_target_layers == 36
    no_ids = json.loads(json.dumps(QWEN3_8B_DFLASH))
    del no_ids["dflash_config"]["target_layer_ids"]
    assert draft_config_from_dict(no_ids).target_layer_ids == (1, 9, 17, 25, 33)
    assert default_target_layer_ids(32, 5) == (1, 8, 15, 22, 29)
    assert default_target_layer_ids(36, 1) == (18,)
    check_draft_fits_target(d, target_config_from_dict(QWEN3_8B))


def test_draft_sliding_window_layers():
    d = dict(QWEN3_8B_DFLASH, is_causal=False, sliding_window=2048,
             layer_types=["sliding_attention"] * 2 + ["full_attention"] * 3)
    c = draft_config_from_dict(d)
    assert c.sliding_windows == (2048, 2048, None, None, None)
    assert c.sliding_window(0) == 2048 and c.sliding_window(4) is None
    # z-lab treats sliding layers as causal unless is_causal=false says otherwise: refused
    d2 = dict(d)
    del d2["is_causal"]
    with pytest.raises(ValueError, match="causal"):
        draft_config_from_dict(d2)
    # round trip through our writer
    again = draft_config_from_dict(to_hf_dict(c))
    assert again == c


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gemma"), "model_type"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling"),
    (dict(attention_bias=True), "bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=5), "multiple"),
])
def test_bad_target_configs(change, match):
    with pytest.raises(ValueError, match=match):
        target_config_from_dict(dict(LLAMA31_8B, **change))


def test_zlab_dflash2_fixture_config_is_refused():
    """The DFlash2 fixture config of z-lab's repository (sliding layers, candidate selector)."""
    d = dict(QWEN3_8B_DFLASH, is_causal=False, sliding_window=2048,
             layer_types=["sliding_attention"] * 5,
             dflash_config={"block_size": 16, "conv_kernel_size": 2, "selector_rank": 256,
                            "mask_token_id": 1, "target_layer_ids": [1, 13, 25, 37, 49]})
    with pytest.raises(ValueError, match="DFlash2"):
        draft_config_from_dict(d)


def test_bad_draft_configs():
    d = json.loads(json.dumps(QWEN3_8B_DFLASH))
    del d["dflash_config"]["mask_token_id"]
    with pytest.raises(ValueError, match="mask_token_id"):
        draft_config_from_dict(d)
    d = json.loads(json.dumps(QWEN3_8B_DFLASH))
    del d["dflash_config"]["target_layer_ids"], d["num_target_layers"]
    with pytest.raises(ValueError, match="target_layer_ids"):
        draft_config_from_dict(d)
    tgt = target_config_from_dict(LLAMA31_8B)          # 32 layers, vocab 128256
    d = draft_config_from_dict(QWEN3_8B_DFLASH)
    with pytest.raises(ValueError, match="vocab_size"):
        check_draft_fits_target(d, tgt)
    d = draft_config_from_dict(dict(QWEN3_8B_DFLASH, vocab_size=128256))
    with pytest.raises(ValueError, match="target_layer_ids"):
        check_draft_fits_target(d, tgt)                 # layer 33 of a 32-layer target


def test_config_files(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.json").write_text(json.dumps(QWEN3_8B))
    assert load_target_config(tmp_path / "t").num_layers == 36
    (tmp_path / "d.json").write_text(json.dumps(QWEN3_8B_DFLASH))
    assert load_draft_config(tmp_path / "d.json").num_layers == 5


def test_rope_is_relative_and_norm_preserving():
    rng = np.random.default_rng(0)
    inv = rope_inv_freq(64, 10000.0, None)
    q = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 1, 64)), jnp.float32)

    def dot(m, n):
        qm = apply_rope(q, jnp.asarray([[m]]), inv)
        kn = apply_rope(k, jnp.asarray([[n]]), inv)
        return float(jnp.sum(qm * kn))

    assert np.isclose(dot(5, 3), dot(105, 103), rtol=1e-4)
    assert not np.isclose(dot(5, 3), dot(5, 4), rtol=1e-3)
    r = apply_rope(q, jnp.asarray([[77]]), inv)
    assert np.isclose(float(jnp.linalg.norm(r)), float(jnp.linalg.norm(q)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(apply_rope(q, jnp.asarray([[0]]), inv)), np.asarray(q))


def test_rms_norm():
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    w = np.linspace(0.5, 1.5, 16).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6)), want,
                               rtol=1e-5)


def test_page_allocator_hands_out_frees_and_reuses():
    a = PageAllocator(num_pages=6, page_size=4, max_slots=3, pages_per_seq=4,
                      unused_index=10**9)
    assert (a.page_table == 10**9).all()
    a.ensure(0, 9)                       # 3 pages
    a.ensure(1, 4)                       # 1 page
    assert a.num_free == 2 and len(a.owned(0)) == 3
    assert sorted(a.owned(0) + a.owned(1)) == [0, 1, 2, 3]
    assert list(a.page_table[0, :3]) == a.owned(0) and a.page_table[0, 3] == 10**9
    a.ensure(0, 10)                      # still 3 pages: no change
    assert a.num_free == 2
    assert not a.can_allocate(2, 12)
    with pytest.raises(OutOfPages):
        a.ensure(2, 12)
    with pytest.raises(OutOfPages, match="pages_per_seq"):
        a.ensure(1, 17)
    a.free(0)
    assert a.num_free == 5 and (a.page_table[0] == 10**9).all()
    a.ensure(2, 12)                      # reuses the freed pages
    assert len(set(a.owned(2)) | set(a.owned(1))) == 4
    a.free(1), a.free(2)
    assert a.num_free == 6


def test_page_allocator_parts_have_their_own_pools():
    # 2 data groups of 2 slots, 4 pages each: page ids are local to a group's pool
    a = PageAllocator(num_pages=8, page_size=4, max_slots=4, pages_per_seq=4, parts=2)
    a.ensure(0, 12)                      # group 0: 3 of its 4 pages
    a.ensure(2, 16)                      # group 1: all 4 of its pages, ids 0..3 of its pool
    assert sorted(a.owned(0)) == [0, 1, 2] and sorted(a.owned(2)) == [0, 1, 2, 3]
    assert a.num_free == 1
    assert a.can_allocate(1, 4) and not a.can_allocate(3, 4)     # group 1 is full, group 0 not
    with pytest.raises(OutOfPages):
        a.ensure(3, 4)
    a.free(2)
    assert a.can_allocate(3, 16) and not a.can_allocate(1, 8)
    with pytest.raises(ValueError, match="parts=3 must divide"):
        PageAllocator(num_pages=8, page_size=4, max_slots=4, pages_per_seq=4, parts=3)
