"""Training objectives: next-token loss of the target, the DFlash drafter's packed block loss.

`target`: next-token pre-training of a Llama/Qwen3-style decoder on the stdlib byte corpus
(`models.training.data`), saved in Hugging Face naming (`models.loading.save_checkpoint`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.draft import DraftModel
from models.layers import apply_rope
from models.target import TargetModel

# ------------------------------------------------------------------------------------------------
# optimizer


def target_loss(model: TargetModel, tokens):
    """Mean next-token cross-entropy (nats) of int32 tokens [B, n+1]."""
    h, _ = model.dense_forward(tokens[:, :-1])
    logits = model.logits(h)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_target_step(graphdef, opt):
    def loss_fn(state, tokens):
        return target_loss(nnx.merge(graphdef, state), tokens)

    @jax.jit
    def step(state, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state, tokens)
        updates, opt_state = opt.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    @jax.jit
    def evaluate(state, tokens):
        return loss_fn(state, tokens)
    return step, evaluate


# ------------------------------------------------------------------------------------------------
# DFlash drafter training


def block_weights(block_size: int, gamma: float | None = None):
    """exp(-(k-1)/gamma) for draft positions k = 1..bs-1 (gamma: 7 for bs 16, 5 for 10, 4 for 8,
    else bs/2.3)."""
    if gamma is None:
        gamma = {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, block_size / 2.3)
    k = np.arange(1, block_size, dtype=np.float64)
    return np.exp(-(k - 1) / gamma).astype(np.float32)


def sample_anchors(rng: np.random.Generator, batch: int, seq_len: int, num_anchors: int,
                   block_size: int, *, low: int = 1):
    """Sorted distinct anchors per sequence in [low, seq_len - block_size]: int32 [B, A]."""
    high = seq_len - block_size            # inclusive: the block's last position is seq_len - 1
    n = high - low + 1
    if n < num_anchors:
        raise ValueError(f"{num_anchors} anchors do not fit in positions [{low}, {high}] "
                         f"(seq_len {seq_len}, block_size {block_size})")
    return np.sort(np.stack([rng.choice(n, num_anchors, replace=False) + low
                             for _ in range(batch)]), axis=1).astype(np.int32)


def target_features(target: TargetModel, tokens, feature_layers):
    """Frozen target on full sequences: (features [B, T, nF*H], argmax labels [B, T]).

    argmax label at position p = the target's greedy prediction for token p (from position p-1);
    position 0 keeps the data token."""
    h, feats = target.dense_forward(tokens, feature_layers=tuple(feature_layers))
    pred = jnp.argmax(target.logits(h), axis=-1).astype(jnp.int32)
    labels = jnp.concatenate([tokens[:, :1], pred[:, :-1]], axis=1)
    return jax.lax.stop_gradient(feats), labels


def packed_draft_hidden(draft: DraftModel, ctx, block_emb, anchors, block_size: int):
    """Draft forward over many blocks of one sequence at once (training form).

    ctx: [B, T, H] (draft.context of the target features at positions 0..T-1);
    block_emb: [B, A*bs, H] (target embedding of [token at a_j, MASK...] for each anchor);
    anchors: int32 [B, A]. Block j's queries see context positions < a_j and the bs entries of
    block j (bidirectionally), nothing else. Returns final-normed hidden states [B, A*bs, H].
    """
    cfg = draft.config
    if cfg.sliding_windows:
        raise NotImplementedError("training drafts with sliding-window layers")
    b, t, _ = ctx.shape
    a = anchors.shape[1]
    bs = block_size
    inv = draft.inv_freq()
    cpos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bpos = anchors[:, :, None] + jnp.arange(bs, dtype=jnp.int32)               # [B, A, bs]
    # block j sees context positions < a_j; within a block everything is visible, and the
    # blocks never see each other, so block scores are computed per block ([A, bs, bs]) rather
    # than over all A*bs block keys (a dense [A*bs, T + A*bs] mask does ~2x the score work)
    vis_ctx = (cpos[:, None, :] < anchors[:, :, None])[:, None, None, :, None, :]  # [B,1,1,A,1,T]
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    g = cfg.num_heads // hkv
    scale = 1.0 / math.sqrt(d)
    h = block_emb.reshape(b, a, bs, -1)
    for i, layer in enumerate(draft.layers):
        x = layer.input_layernorm(h)
        q = apply_rope(layer.self_attn.query(x), bpos, inv).astype(jnp.float32)
        q = q.reshape(b, a, bs, hkv, g, d)
        kc, vc = draft.context_kv(i, ctx, cpos)                                # [B, T, Hkv, D]
        kb, vb = layer.self_attn.key_value(x)                                  # [B, A, bs, Hkv, D]
        kb = apply_rope(kb, bpos, inv)
        s_ctx = jnp.einsum("bajhgd,bthd->bhgajt", q, kc.astype(jnp.float32)) * scale
        s_ctx = jnp.where(vis_ctx, s_ctx, -jnp.inf)
        s_blk = jnp.einsum("bajhgd,bakhd->bhgajk", q, kb.astype(jnp.float32)) * scale
        p = jax.nn.softmax(jnp.concatenate([s_ctx, s_blk], axis=-1), axis=-1)
        o = (jnp.einsum("bhgajt,bthd->bajhgd", p[..., :t], vc.astype(jnp.float32))
             + jnp.einsum("bhgajk,bakhd->bajhgd", p[..., t:], vb.astype(jnp.float32)))
        h = h + layer.self_attn.output(o.reshape(b, a, bs, hkv * g, d).astype(h.dtype))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = h.reshape(b, a * bs, -1)
    return draft.norm(h)


def draft_block_outputs(draft: DraftModel, target: TargetModel, tokens, feats, labels, anchors):
    """Per-block cross-entropy and correctness of the draft.

    tokens: int32 [B, T] (the sequence); feats: [B, T, nF*H] target features; labels: int32
    [B, T] (label for the token AT each position: data tokens or target argmax); anchors [B, A].
    Returns (ce [B, A, bs-1], correct bool [B, A, bs-1]) for draft positions k = 1..bs-1.
    """
    bs = draft.config.block_size
    b, a = anchors.shape
    first = jnp.take_along_axis(tokens, anchors, axis=1)                         # [B, A]
    block = jnp.concatenate(
        [first[:, :, None], jnp.full((b, a, bs - 1), draft.config.mask_token_id, jnp.int32)],
        axis=2).reshape(b, a * bs)
    ctx = draft.context(feats)
    h = packed_draft_hidden(draft, ctx, target.embed(block), anchors, bs)
    h = h.reshape(b, a, bs, -1)[:, :, 1:]
    logits = target.logits(h)                                                  # [B, A, bs-1, V]
    lpos = anchors[:, :, None] + jnp.arange(1, bs, dtype=jnp.int32)
    lab = jnp.take_along_axis(labels, lpos.reshape(b, -1), axis=1).reshape(b, a, bs - 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, lab)
    correct = jnp.argmax(logits, axis=-1) == lab
    return ce, correct


def acceptance_from_correct(correct):
    """tau estimate: 1 + length of the all-correct prefix of each block; and per-position
    acceptance rates (fraction of blocks whose first k drafts are all right)."""
    prefix = jnp.cumprod(correct.astype(jnp.float32), axis=-1)                 # [..., bs-1]
    per_pos = prefix.reshape(-1, prefix.shape[-1]).mean(axis=0)
    return 1.0 + prefix.sum(-1).mean(), per_pos


def make_draft_step(graphdef_d, graphdef_t, opt, *, feature_layers, label_kind: str, weights):
    weights = jnp.asarray(weights)

    def outputs(dstate, tstate, tokens, anchors):
        target = nnx.merge(graphdef_t, tstate)
        draft = nnx.merge(graphdef_d, dstate)
        feats, argmax_labels = target_features(target, tokens, feature_layers)
        labels = argmax_labels if label_kind == "argmax" else tokens
        return draft_block_outputs(draft, target, tokens, feats, labels, anchors)

    def loss_fn(dstate, tstate, tokens, anchors):
        ce, correct = outputs(dstate, tstate, tokens, anchors)
        loss = (ce * weights).sum(-1).mean() / weights.sum()
        return loss, correct

    @jax.jit
    def step(dstate, opt_state, tstate, tokens, anchors):
        (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            dstate, tstate, tokens, anchors)
        updates, opt_state = opt.update(grads, opt_state, dstate)
        tau, _ = acceptance_from_correct(correct)
        return optax.apply_updates(dstate, updates), opt_state, loss, tau

    @jax.jit
    def evaluate(dstate, tstate, tokens, anchors):
        loss, correct = loss_fn(dstate, tstate, tokens, anchors)
        tau, per_pos = acceptance_from_correct(correct)
        return loss, tau, per_pos
    return step, evaluate


# ------------------------------------------------------------------------------------------------
# rollouts: the target's own greedy continuations
