"""Model configurations read from Hugging Face `config.json` files.

- `TargetConfig`: Llama-3.x (`model_type` "llama", optional `rope_scaling` of type "llama3") and
  Qwen3 (`model_type` "qwen3": per-head q_norm/k_norm, usually tied embeddings).
- `DraftConfig`: z-lab DFlash drafts (Qwen3-style layers; `block_size`, `dflash_config.mask_token_id`,
  `dflash_config.target_layer_ids` or the evenly spaced default, `num_target_layers`, optional
  per-layer sliding window through `layer_types` + `sliding_window`).

Both accept the older top-level `rope_theta`/`rope_scaling` keys and the newer `rope_parameters`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type` / `type` "llama3")."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm over each head of q and k before RoPE
    model_type: str = "llama"
    max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_attention_geometry(self, "target")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    mask_token_id: int
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    sliding_windows: tuple[int | None, ...] = ()   # per draft layer; () = all full attention

    def __post_init__(self):
        _check_attention_geometry(self, "draft")
        if self.block_size < 2:
            raise ValueError(f"draft block_size must be >= 2, got {self.block_size}")
        if not self.target_layer_ids:
            raise ValueError("draft target_layer_ids is empty")
        if self.sliding_windows and len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"draft sliding_windows has {len(self.sliding_windows)} entries for "
                             f"{self.num_layers} layers")

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    def sliding_window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


def _check_attention_geometry(cfg, what):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{what} config: {name} must be positive, got {getattr(cfg, name)}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{what} config: num_attention_heads={cfg.num_heads} is not a multiple "
                         f"of num_key_value_heads={cfg.num_kv_heads}")


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """z-lab's default: one target layer per draft layer, spaced evenly from layer 1 to N-3
    (a single draft layer reads the middle layer). E.g. 36 target, 5 draft -> (1, 9, 17, 25, 33)."""
    if num_draft_layers <= 0:
        raise ValueError("num_draft_layers must be positive")
    if num_draft_layers == 1:
        return (num_target_layers // 2,)
    start, end = 1, num_target_layers - 3
    span = end - start
    return tuple(int(round(start + i * span / (num_draft_layers - 1)))
                 for i in range(num_draft_layers))


def _rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default"
                                        else None)
    if not scaling:
        return theta, None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, llama3)")
    return theta, RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def _geometry(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("attention/MLP biases are not supported (Llama-3.x and Qwen3 have none)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r} (only silu / SwiGLU)")
    heads = int(d["num_attention_heads"])
    theta, scaling = _rope(d)
    return dict(
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads", heads)),
        head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
    )


def target_config_from_dict(d: dict[str, Any]) -> TargetConfig:
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "qwen3"):
        raise ValueError(f"unsupported target model_type {model_type!r} (llama, qwen3)")
    return TargetConfig(
        **_geometry(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)),
    )


def draft_config_from_dict(d: dict[str, Any]) -> DraftConfig:
    dflash = d.get("dflash_config") or {}

    def get(name, default=None):
        return dflash.get(name, d.get(name, default))

    geo = _geometry(d)
    # z-lab options this draft does not implement. (`output_multiplier` > 0 and
    # `final_logit_softcapping` leave the greedy drafts unchanged, so they are accepted.)
    if float(get("input_embedding_scale", 1.0)) != 1.0:
        raise ValueError("draft input_embedding_scale != 1 is not supported")
    if float(get("output_multiplier", 1.0)) <= 0:
        raise ValueError("draft output_multiplier must be positive")
    if any(k in dflash for k in ("selector_rank", "conv_kernel_size")):
        raise ValueError("DFlash2 drafts (candidate selector, dynamic convolutions) are not "
                         "supported")
    num_target_layers = get("num_target_layers")
    ids = get("target_layer_ids")
    if ids is None:
        if num_target_layers is None:
            raise ValueError("draft config has neither dflash_config.target_layer_ids nor "
                             "num_target_layers")
        ids = default_target_layer_ids(int(num_target_layers), geo["num_layers"])
    mask = get("mask_token_id")
    if mask is None:
        raise ValueError("draft config lacks dflash_config.mask_token_id")
    layer_types = d.get("layer_types")
    windows: tuple = ()
    if layer_types:
        if len(layer_types) != geo["num_layers"]:
            raise ValueError(f"layer_types has {len(layer_types)} entries for "
                             f"{geo['num_layers']} layers")
        w = d.get("sliding_window")
        windows = tuple(int(w) if t == "sliding_attention" and w else None for t in layer_types)
        if all(x is None for x in windows):
            windows = ()
    # z-lab: a layer is causal if `is_causal` says so, or (when it is absent) if it is a sliding
    # layer. This decoder implements the non-causal block attention of DFlash only.
    is_causal = d.get("is_causal")
    if is_causal or (is_causal is None and windows):
        raise ValueError("causal DFlash draft layers are not supported (is_causal=true, or "
                         "sliding_attention layers without is_causal=false)")
    return DraftConfig(
        **geo,
        block_size=int(get("block_size", 16)),
        mask_token_id=int(mask),
        target_layer_ids=tuple(int(i) for i in ids),
        num_target_layers=int(num_target_layers) if num_target_layers is not None
        else max(int(i) for i in ids) + 1,
        sliding_windows=windows,
    )


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def load_target_config(path) -> TargetConfig:
    """A target config from a `config.json` file or a checkpoint directory containing one."""
    return target_config_from_dict(_read_json(path))


def load_draft_config(path) -> DraftConfig:
    """A DFlash draft config from a `config.json` file or a checkpoint directory."""
    return draft_config_from_dict(_read_json(path))


def check_draft_fits_target(draft: DraftConfig, target: TargetConfig) -> None:
    """Refuse a draft that cannot run on this target, with the reason."""
    if draft.hidden_size != target.hidden_size:
        raise ValueError(f"draft hidden_size {draft.hidden_size} != target hidden_size "
                         f"{target.hidden_size} (the draft shares the target's embedding)")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(f"draft vocab_size {draft.vocab_size} != target vocab_size "
                         f"{target.vocab_size} (the draft shares the target's lm_head)")
    bad = [i for i in draft.target_layer_ids if not 0 <= i < target.num_layers]
    if bad:
        raise ValueError(f"draft target_layer_ids {list(draft.target_layer_ids)} include {bad}, "
                         f"outside the target's {target.num_layers} layers")
    if not 0 <= draft.mask_token_id < target.vocab_size:
        raise ValueError(f"draft mask_token_id {draft.mask_token_id} is outside the vocabulary "
                         f"of {target.vocab_size}")


def to_hf_dict(cfg: TargetConfig | DraftConfig) -> dict[str, Any]:
    """The config in Hugging Face / z-lab `config.json` form (used to write test checkpoints)."""
    d: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "hidden_act": "silu", "attention_bias": False,
    }
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    if isinstance(cfg, TargetConfig):
        d.update(model_type=cfg.model_type, tie_word_embeddings=cfg.tie_word_embeddings,
                 max_position_embeddings=cfg.max_position_embeddings)
    else:
        d.update(model_type="qwen3", architectures=["DFlashDraftModel"],
                 num_target_layers=cfg.num_target_layers, block_size=cfg.block_size,
                 dflash_config={"mask_token_id": cfg.mask_token_id,
                                "target_layer_ids": list(cfg.target_layer_ids)})
        if cfg.sliding_windows:
            d["layer_types"] = ["sliding_attention" if w else "full_attention"
                                for w in cfg.sliding_windows]
            d["sliding_window"] = max(w for w in cfg.sliding_windows if w)
            d["is_causal"] = False
    return d

