"""The target model (Llama-3.x / Qwen3 decoder) over a paged KV cache.

`TargetModel.forward` runs a ragged batch of new tokens (prefill chunks, 1-token decode or a
bs-token verify block per sequence) through the layers, writing each layer's new keys/values into
its pages (`write_kv_pages`) and attending with `paged_attention`. It returns the final-normed
hidden states, the DFlash features (hidden states after the layers in `feature_layers`,
concatenated) and the updated caches. `TargetModel.dense_forward` is a plain causal forward
(no cache) used as a reference in tests.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import TargetConfig
from models.kv_cache import new_rows
from models.layers import MLP, Attention, RMSNorm, apply_rope, rope_inv_freq


class TargetLayer(nnx.Module):
    def __init__(self, cfg: TargetConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   qk_norm=cfg.qk_norm, eps=cfg.rms_norm_eps, dtype=dtype,
                                   rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)


class TargetModel(nnx.Module):
    """Llama-3.x / Qwen3 decoder-only LM. Parameters in `dtype` (f32 or bf16)."""

    def __init__(self, cfg: TargetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size)).astype(dtype))
        self.layers = nnx.List([TargetLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nnx.Param(
                (jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size))
                 / jnp.sqrt(cfg.hidden_size)).astype(dtype))

    # -- shared pieces (also used by the draft: embedding and lm_head are the target's) ----------
    def embed(self, tokens, ops=None):
        """[..., H] embeddings. Under tensor parallelism (ops.model_axis) the table holds this
        shard's contiguous vocabulary rows: a masked local lookup, summed over the shards."""
        table = self.embed_tokens[...]
        axis = getattr(ops, "model_axis", None)
        if axis is None:
            return jnp.take(table, tokens, axis=0)
        local = tokens - jax.lax.axis_index(axis) * table.shape[0]
        mine = (local >= 0) & (local < table.shape[0])
        rows = jnp.take(table, jnp.clip(local, 0, table.shape[0] - 1), axis=0)
        return ops.all_reduce(jnp.where(mine[..., None], rows, jnp.zeros_like(rows)))

    def logits(self, h):
        """f32 logits from final-normed hidden states [..., H] -> [..., V] (under tensor
        parallelism [..., V / n]: this shard's vocabulary columns)."""
        w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("...h,hv->...v", h, w, preferred_element_type=jnp.float32)

    def inv_freq(self):
        cfg = self.config
        return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def _feature(self, i, h):
        # Hugging Face's hidden_states[i + 1]: the output of layer i; after the last layer HF
        # reports the final-normed state.
        return self.norm(h) if i == self.config.num_layers - 1 else h

    # -- paged forward -------------------------------------------------------------------------
    def forward(self, tokens, positions, caches, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                ops, feature_layers=()):
        """Ragged forward over the paged KV cache.

        Args:
          tokens: int32 [T]; positions: int32 [T] (absolute position of each token);
          caches: tuple over layers of (k_pages, v_pages), each [Hkv, P, page_size, D] (8-bit
            caches: plus their scales, `models.kv_cache`);
          kv_lens, page_indices, cu_q_lens, num_seqs: as in `pallas_ops.paged_attention`
            (kv_lens count the new tokens).
          ops: a `models.ops.Ops`; feature_layers: target layer ids whose outputs are returned.
        Returns:
          (hidden [T, H] final-normed, features [T, len(feature_layers) * H] or None,
           new caches).
        """
        inv = self.inv_freq()
        h = self.embed(tokens, ops)
        feats = {}
        new_caches = []
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q = apply_rope(layer.self_attn.query(x), positions, inv)
            k, v = layer.self_attn.key_value(x)
            k = apply_rope(k, positions, inv)
            cache = ops.write_kv_pages(caches[i], new_rows(k, caches[i]), new_rows(v, caches[i]),
                                       kv_lens, page_indices, cu_q_lens, num_seqs)
            o = ops.paged_attention(q, cache, kv_lens, page_indices, cu_q_lens, num_seqs)
            h = h + ops.all_reduce(layer.self_attn.output(o))
            h = h + ops.all_reduce(layer.mlp(layer.post_attention_layernorm(h)))
            new_caches.append(cache)
            if i in feature_layers:
                feats[i] = self._feature(i, h)
        features = (jnp.concatenate([feats[i] for i in feature_layers], axis=-1)
                    if feature_layers else None)
        return self.norm(h), features, tuple(new_caches)

    # -- dense reference forward ---------------------------------------------------------------
    def dense_forward(self, tokens, *, feature_layers=()):
        """Plain causal forward of full sequences, no cache (a reference for tests).

        tokens: int32 [B, n]. Returns (hidden [B, n, H] final-normed, features or None).
        """
        cfg = self.config
        inv = self.inv_freq()
        n = tokens.shape[1]
        pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), tokens.shape)
        h = self.embed(tokens)
        feats = {}
        mask = jnp.tril(jnp.ones((n, n), bool))
        g = cfg.num_heads // cfg.num_kv_heads
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q = apply_rope(layer.self_attn.query(x), pos, inv).astype(jnp.float32)
            k, v = layer.self_attn.key_value(x)
            k = jnp.repeat(apply_rope(k, pos, inv).astype(jnp.float32), g, axis=2)
            v = jnp.repeat(v.astype(jnp.float32), g, axis=2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                           precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(cfg.head_dim)
            s = jnp.where(mask, s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", p, v,
                           precision=jax.lax.Precision.HIGHEST).astype(h.dtype)
            h = h + layer.self_attn.output(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i in feature_layers:
                feats[i] = self._feature(i, h)
        features = (jnp.concatenate([feats[i] for i in feature_layers], axis=-1)
                    if feature_layers else None)
        return self.norm(h), features
