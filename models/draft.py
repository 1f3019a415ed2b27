"""The DFlash draft: a few Qwen3-style layers conditioned on the target's hidden features.

Per z-lab's `DFlashDraftModel` (see ../shared/DESIGN.md section 1):
  ctx = hidden_norm(fc(concat(target features)))            [.., H]
  every layer: context keys/values = k_norm(k_proj(ctx)), v_proj(ctx) (RoPE at the context's own
  positions), kept in a static per-sequence cache ("dual cache"); block keys/values/queries from
  the block's hidden states (input_layernorm'd); non-causal attention over [context ; block].
  output = norm(h); draft logits = the TARGET's lm_head on block positions 1..bs-1.
The block input is [last accepted token, MASK x (bs-1)] embedded with the TARGET's embedding.
The block's own keys/values are never kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import DraftConfig
from models.kv_cache import new_rows
from models.layers import MLP, Attention, Linear, RMSNorm, apply_rope, rope_inv_freq


class DraftLayer(nnx.Module):
    def __init__(self, cfg: DraftConfig, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   qk_norm=True, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)


class DraftModel(nnx.Module):
    """DFlash block-diffusion draft (one denoising step). Embedding and lm_head: the target's."""

    def __init__(self, cfg: DraftConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(1)
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.fc = Linear(cfg.num_features * cfg.hidden_size, cfg.hidden_size, dtype=dtype,
                         rngs=rngs)
        self.hidden_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.layers = nnx.List([DraftLayer(cfg, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def inv_freq(self):
        cfg = self.config
        return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def context(self, features):
        """features [..., n_feat * H] (target hidden states, concatenated) -> ctx [..., H]."""
        return self.hidden_norm(self.fc(features))

    def context_kv(self, layer: int, ctx, positions):
        """This layer's context keys (k_norm + RoPE) and values: [..., n, Hkv, D] each."""
        attn = self.layers[layer].self_attn
        k, v = attn.key_value(ctx)
        return apply_rope(k, positions, self.inv_freq()), v

    def append_context(self, features, positions, caches, ctx_lens, n_new, *, ops):
        """Append new context entries to every layer's static cache.

        features: [B, n_max, n_feat * H]; positions: int32 [B, n_max] (absolute positions of
        those tokens); caches: tuple over layers of (k_cache, v_cache) [B, Hkv, S_max, D]
        (8-bit caches: plus their scales, `models.kv_cache`);
        ctx_lens: int32 [B] write offsets; n_new: int32 [B] rows to append. Returns new caches.
        """
        return self.append_ctx(self.context(features), positions, caches, ctx_lens, n_new, ops=ops)

    def append_rows(self, ctx, positions, rows, caches, ctx_lens, n_new, *, ops):
        """Append from a flat ragged batch (prefill): ctx [T, H] and positions int32 [T] of T
        rows; rows int32 [B, n_max] picks sequence b's rows. K/V are projected once per row,
        then gathered per sequence."""
        out = []
        for i in range(len(self.layers)):
            k, v = self.context_kv(i, ctx, positions)                     # [T, Hkv, D]
            out.append(ops.append_context(caches[i], new_rows(k[rows], caches[i]),
                                          new_rows(v[rows], caches[i]), ctx_lens, n_new))
        return tuple(out)

    def append_ctx(self, ctx, positions, caches, ctx_lens, n_new, *, ops):
        """`append_context` from already projected context ctx [B, n_max, H]."""
        out = []
        for i in range(len(self.layers)):
            k, v = self.context_kv(i, ctx, positions)
            out.append(ops.append_context(caches[i], new_rows(k, caches[i]),
                                          new_rows(v, caches[i]), ctx_lens, n_new))
        return tuple(out)

    def __call__(self, block_emb, positions, caches, ctx_lens, *, ops):
        """One denoising step over the block.

        block_emb: [B, bs, H] (target embedding of [last token, MASK...]); positions: int32
        [B, bs] (= ctx_len + arange(bs)); caches/ctx_lens: the static context caches.
        Returns the final-normed hidden states [B, bs, H].
        """
        inv = self.inv_freq()
        h = block_emb
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q = apply_rope(layer.self_attn.query(x), positions, inv)
            k, v = layer.self_attn.key_value(x)
            k = apply_rope(k, positions, inv)
            o = ops.block_attention(q, k, v, caches[i], ctx_lens,
                                    sliding_window=self.config.sliding_window(i))
            h = h + ops.all_reduce(layer.self_attn.output(o))
            h = h + ops.all_reduce(layer.mlp(layer.post_attention_layernorm(h)))
        return self.norm(h)

    def dense_forward(self, features, block_emb, start):
        """Reference: the z-lab formula with no cache. features [B, C, nF*H] for positions
        0..C-1, block_emb [B, bs, H] at positions start..start+bs-1 (start = C). Returns [B, bs, H].
        """
        cfg = self.config
        inv = self.inv_freq()
        b, c = features.shape[:2]
        bs = block_emb.shape[1]
        ctx = self.context(features)
        cpos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
        bpos = jnp.broadcast_to(start + jnp.arange(bs, dtype=jnp.int32), (b, bs))
        g = cfg.num_heads // cfg.num_kv_heads
        h = block_emb
        for i, layer in enumerate(self.layers):
            x = layer.input_layernorm(h)
            q = apply_rope(layer.self_attn.query(x), bpos, inv).astype(jnp.float32)
            kc, vc = self.context_kv(i, ctx, cpos)
            kb, vb = layer.self_attn.key_value(x)
            kb = apply_rope(kb, bpos, inv)
            k = jnp.repeat(jnp.concatenate([kc, kb], 1).astype(jnp.float32), g, axis=2)
            v = jnp.repeat(jnp.concatenate([vc, vb], 1).astype(jnp.float32), g, axis=2)
            s = jnp.einsum("bqhd,bkhd->bhqk", q, k,
                           precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(cfg.head_dim)
            w = cfg.sliding_window(i)
            if w is not None:
                kpos = jnp.concatenate([jnp.arange(c), start + jnp.arange(bs)])
                qpos = start + jnp.arange(bs)
                vis = (kpos[None, :] > qpos[:, None] - w) | (kpos[None, :] >= start)
                s = jnp.where(vis, s, -jnp.inf)
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("bhqk,bkhd->bqhd", p, v,
                           precision=jax.lax.Precision.HIGHEST).astype(h.dtype)
            h = h + layer.self_attn.output(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)
