"""Training in JAX: small target LMs (for demos) and DFlash drafters for a frozen target.

    python -m models.train target --out DIR [--layers 5 --hidden 192 ...] --steps N
    python -m models.train rollouts --target DIR --out FILE.npy --num N [--prompt-len P --gen-len G]
    python -m models.train draft --target DIR --out DIR [--layers 3 --block-size 16]
        [--labels argmax|data] [--rollouts FILE.npy] --steps N

`target`: next-token pre-training of a Llama/Qwen3-style decoder on the stdlib byte corpus
(`models.train_data`), saved in Hugging Face naming (`models.loading.save_checkpoint`).

`draft`: DFlash drafter training (paper section 4.2, ../shared/DESIGN.md section 1). The target is
frozen; each training sequence gets `--anchors` random anchor positions; block j is
[token at a_j, MASK x (bs-1)] at positions [a_j, a_j + bs); every block sees the target features of
the clean prefix before its anchor (positions < a_j) and its own block bidirectionally, nothing of
the other blocks (all blocks of a sequence are packed into one pass under a mask, and the context
keys/values are computed once per sequence). Cross-entropy on block positions k = 1..bs-1 weighted
exp(-(k-1)/gamma); embedding and lm_head are the target's (frozen). Labels: "data" (the sequence's
own next tokens) or "argmax" (the target's greedy prediction at each position, from the same
forward pass that yields the features: cheap self-distillation). With `--rollouts` the sequences
are the target's own greedy continuations of corpus prompts (`rollouts` subcommand), so both label
kinds agree with what the target will emit at decode time. Saved in z-lab naming.

Both use AdamW with linear warmup + cosine decay and global-norm clipping (optax). Progress lines
go to stderr; held-out metrics every --eval-every steps; the checkpoint is rewritten every
--save-every steps and at the end (with `train_log.json`: arguments, timings and metrics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models import train_data
from models.config import DraftConfig, TargetConfig
from models.draft import DraftModel
from models.layers import apply_rope
from models.target import TargetModel

# ------------------------------------------------------------------------------------------------
# optimizer


def make_optimizer(lr: float, total_steps: int, *, warmup: float = 0.04, clip: float = 1.0,
                   weight_decay: float = 0.01, end_fraction: float = 0.05):
    """AdamW, linear warmup over `warmup` of the steps then cosine decay, global-norm clipping."""
    warm = max(1, int(round(warmup * total_steps)))
    sched = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warm,
        decay_steps=max(total_steps, warm + 1), end_value=lr * end_fraction)
    opt = optax.chain(optax.clip_by_global_norm(clip),
                      optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=weight_decay))
    return opt, sched


def make_host_lr_optimizer(*, clip: float = 1.0, weight_decay: float = 0.01):
    """The same AdamW + clipping with the learning rate set from the host every step
    (`set_lr`), so the cosine schedule can follow a time budget (--minutes)."""
    return optax.chain(optax.clip_by_global_norm(clip),
                       optax.inject_hyperparams(optax.adamw)(
                           learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=weight_decay))


def set_lr(opt_state, lr: float):
    opt_state[1].hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    return opt_state


def warmup_cosine(step: int, total: int, peak: float, *, warmup_steps: int,
                  end_fraction: float = 0.05) -> float:
    """Host-side learning rate: linear warmup to `peak`, cosine decay to peak*end_fraction."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    frac = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    end = peak * end_fraction
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


# ------------------------------------------------------------------------------------------------
# target pre-training


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


def make_rollouts(target: TargetModel, prompts: np.ndarray, gen_len: int, *, batch: int = 64,
                  backend: str = "xla", log=None) -> np.ndarray:
    """Greedy continuations of int32 prompts [N, P]: returns int32 [N, P + gen_len]."""
    from models.decoder import generate_autoregressive

    out = []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        res = generate_autoregressive(target, [list(p) for p in chunk], max_new_tokens=gen_len,
                                      max_batch=batch, backend=backend)
        for p, toks in zip(chunk, res.tokens):
            toks = (list(toks) + [train_data.EOS_ID] * gen_len)[:gen_len]
            out.append(np.concatenate([p, np.asarray(toks, np.int32)]))
        if log:
            n = min(i + batch, len(prompts))
            log(f"rollouts {n}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
    return np.stack(out).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# CLI plumbing


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _bar(step, total, width=24):
    n = int(width * step / max(total, 1))
    return "[" + "#" * n + "." * (width - n) + "]"


def _save(model, out, log_data):
    from models.loading import save_checkpoint

    tmp = out.rstrip("/") + ".tmp"
    save_checkpoint(model, tmp)
    with open(os.path.join(tmp, "train_log.json"), "w") as f:
        json.dump(log_data, f, indent=1)
    if os.path.isdir(out):
        for name in os.listdir(out):
            os.remove(os.path.join(out, name))
        os.rmdir(out)
    os.rename(tmp, out)


def _run(args, *, model, step_fn, eval_fn, next_batch, eval_batches, extra_eval_args,
         format_eval, log_data):
    """The shared loop: steps, progress, periodic eval and checkpoints."""
    graphdef, state = nnx.split(model)
    opt_state = args._opt.init(state)
    total = args.steps                 # with --minutes: re-estimated from the measured speed
    warm = max(1, int(round(0.04 * args.steps)))
    t_start = time.perf_counter()
    t_compile = None
    hist = log_data.setdefault("eval", [])
    last = []

    def run_eval(step):
        vals = [eval_fn(state, *extra_eval_args, *b) for b in eval_batches]
        vals = jax.tree.map(lambda *x: np.mean(np.stack([np.asarray(v) for v in x]), axis=0),
                            *vals)
        entry = {"step": step, "seconds": round(time.perf_counter() - t_start, 1),
                 **format_eval(vals)}
        hist.append(entry)
        _log(f"  eval @ {step}: " + " ".join(f"{k}={v}" for k, v in entry.items()
                                             if k not in ("step",)))

    step = 0
    stop = args.stop_after or None
    budget = args.minutes * 60 if args.minutes else None
    t_loop = None

    def progress():      # fraction of the schedule done, by steps or (--minutes) by time
        if budget is None:
            return step / total
        if t_loop is None:
            return 0.0
        return (time.perf_counter() - t_loop) / max(budget - (t_loop - t_start), 1.0)

    while (progress() < 1.0) if budget else step < (min(total, stop) if stop else total):
        step += 1
        if budget:
            # time-based schedule: warmup over the first 4% of the time budget, then cosine
            lr = warmup_cosine(min(progress(), 1.0) * 10_000, 10_000, args.lr, warmup_steps=400)
        else:
            lr = warmup_cosine(step, total, args.lr, warmup_steps=warm)
        opt_state = set_lr(opt_state, lr)
        batch = next_batch()
        state, opt_state, *metrics = step_fn(state, opt_state, *extra_eval_args, *batch)
        if step == 1:
            jax.block_until_ready(state)
            t_compile = time.perf_counter() - t_start
            t_loop = time.perf_counter()
        if budget:
            total = step if progress() >= 1.0 else max(total, step + 1)
        last.append([float(m) for m in metrics])
        if step % args.log_every == 0 or step == total:
            el = time.perf_counter() - t_start
            rate = (step - 1) / max(el - t_compile, 1e-9) if step > 1 else 0.0
            eta = (total - step) / rate if rate else 0.0
            m = np.mean(np.asarray(last), axis=0)
            last = []
            names = args._metric_names
            _log(f"{_bar(step, total)} {step}/{total} "
                 + " ".join(f"{n}={v:.4f}" for n, v in zip(names, m))
                 + f" lr={lr:.2e} {rate:.2f} step/s "
                 f"elapsed {el / 60:.1f}m eta {eta / 60:.1f}m")
        if args.eval_every and (step % args.eval_every == 0 or step in (total, stop)):
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step != total and step != stop:
            nnx.update(model, state)
            log_data["steps_done"] = step
            log_data["train_seconds"] = round(time.perf_counter() - t_start, 1)
            _save(model, args.out, log_data)
    if args.eval_every and (not hist or hist[-1]["step"] != step):
        run_eval(step)          # the time budget can end between two logged steps
    nnx.update(model, state)
    log_data["steps_done"] = step
    log_data["train_seconds"] = round(time.perf_counter() - t_start, 1)
    _save(model, args.out, log_data)
    _log(f"saved {args.out} after {log_data['train_seconds'] / 60:.1f} min")
    return model


def _window_source(args, rng):
    corpus = train_data.load_corpus("train")
    return lambda: train_data.random_windows(corpus, rng, args.batch, args.seq_len + 1)


def _heldout_windows(n_batches, batch, length, seed=1234):
    held = train_data.load_corpus("heldout")
    rng = np.random.default_rng(seed)
    return [train_data.random_windows(held, rng, batch, length) for _ in range(n_batches)]


def cmd_target(args):
    cfg = TargetConfig(vocab_size=train_data.VOCAB_SIZE, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                       rms_norm_eps=1e-6, rope_theta=10000.0, qk_norm=True, model_type="qwen3",
                       tie_word_embeddings=False, max_position_embeddings=4096)
    g = cfg.num_heads // cfg.num_kv_heads
    if g not in (1, 2, 4, 8) or cfg.head_dim not in (64, 128, 256):
        raise SystemExit(f"heads/kv-heads = {g} and head_dim {cfg.head_dim}: the kernels support "
                         "groups 1, 2, 4, 8 and head dims 64, 128, 256")
    model = TargetModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    # a smaller embedding scale than the default N(0, 1) trains faster
    model.embed_tokens.set_value(model.embed_tokens.get_value() * 0.05)
    args._opt = make_host_lr_optimizer()
    args._metric_names = ("loss",)
    graphdef, _ = nnx.split(model)
    step, evaluate = make_target_step(graphdef, args._opt)
    rng = np.random.default_rng(args.seed)
    src = _window_source(args, rng)
    evals = [(jnp.asarray(b),) for b in _heldout_windows(args.eval_batches, args.batch,
                                                          args.seq_len + 1)]

    def fmt(v):
        return {"heldout_loss": round(float(v), 4),
                "heldout_bits_per_byte": round(float(v) / math.log(2), 4)}
    log_data = {"kind": "target", "argv": sys.argv[1:], "config": cfg.__dict__ | {},
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")
                         and k != "func"}}
    log_data["config"] = {k: (v if not hasattr(v, "__dict__") else str(v))
                          for k, v in cfg.__dict__.items()}
    _run(args, model=model, step_fn=step, eval_fn=evaluate,
         next_batch=lambda: (jnp.asarray(src()),), eval_batches=evals, extra_eval_args=(),
         format_eval=fmt, log_data=log_data)


def evenly_spaced_layers(num_target_layers: int, n: int) -> tuple[int, ...]:
    """n target layer ids spread over 0..N-1 (first and last included when n > 1)."""
    if n == 1:
        return (num_target_layers // 2,)
    return tuple(sorted({int(round(i * (num_target_layers - 1) / (n - 1))) for i in range(n)}))


def cmd_draft(args):
    from models.loading import load_target

    target = load_target(args.target, dtype=jnp.float32)
    tc = target.config
    ids = (tuple(int(x) for x in args.target_layers.split(",")) if args.target_layers
           else evenly_spaced_layers(tc.num_layers, args.num_features))
    cfg = DraftConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                      intermediate_size=args.intermediate or tc.intermediate_size,
                      num_layers=args.layers, num_heads=tc.num_heads,
                      num_kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
                      block_size=args.block_size, mask_token_id=train_data.MASK_ID,
                      target_layer_ids=ids, num_target_layers=tc.num_layers,
                      rms_norm_eps=tc.rms_norm_eps, rope_theta=tc.rope_theta)
    draft = DraftModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    if args.init:              # continue from a drafter checkpoint of the same shape
        from models.loading import load_draft

        draft = load_draft(args.init, dtype=jnp.float32)
        if draft.config != cfg:
            raise SystemExit(f"--init {args.init}: config {draft.config} != {cfg}")
    args._opt = make_host_lr_optimizer()
    args._metric_names = ("loss", "tau_est")
    gd, _ = nnx.split(draft)
    gt, tstate = nnx.split(target)
    weights = block_weights(args.block_size, args.gamma)
    step, evaluate = make_draft_step(gd, gt, args._opt, feature_layers=ids,
                                     label_kind=args.labels, weights=weights)
    rng = np.random.default_rng(args.seed)
    if args.rollouts:
        seqs = np.concatenate([np.load(f) for f in args.rollouts.split(",")])
        if seqs.shape[1] < args.seq_len:
            raise SystemExit(f"rollouts have length {seqs.shape[1]} < --seq-len {args.seq_len}")
        low = args.anchor_min if args.anchor_min is not None else 1

        def next_batch():
            idx = rng.integers(0, len(seqs), args.batch)
            s = rng.integers(0, seqs.shape[1] - args.seq_len + 1)
            toks = seqs[idx, s:s + args.seq_len]
            lo = max(1, low - s)
            return (jnp.asarray(toks), jnp.asarray(sample_anchors(
                rng, args.batch, args.seq_len, args.anchors, args.block_size, low=lo)))
    else:
        corpus = train_data.load_corpus("train")

        def next_batch():
            toks = train_data.random_windows(corpus, rng, args.batch, args.seq_len)
            return (jnp.asarray(toks), jnp.asarray(sample_anchors(
                rng, args.batch, args.seq_len, args.anchors, args.block_size)))
    erng = np.random.default_rng(4321)
    evals = [(jnp.asarray(b), jnp.asarray(sample_anchors(erng, args.batch, args.seq_len,
                                                          args.anchors, args.block_size)))
             for b in _heldout_windows(args.eval_batches, args.batch, args.seq_len)]

    def fmt(v):
        loss, tau, per_pos = v
        return {"heldout_loss": round(float(loss), 4),
                "heldout_tau_est_argmax": round(float(tau), 3) if args.labels == "argmax"
                else None,
                "heldout_tau_est": round(float(tau), 3),
                "per_position": [round(float(x), 3) for x in per_pos]}
    if args.labels != "argmax":
        # held-out acceptance is always measured against the target's argmax (what decoding
        # accepts), whatever the training labels
        _, eval_argmax = make_draft_step(gd, gt, args._opt, feature_layers=ids,
                                         label_kind="argmax", weights=weights)
        evaluate = eval_argmax
    log_data = {"kind": "draft", "argv": sys.argv[1:], "target": os.path.abspath(args.target),
                "args": {k: v for k, v in vars(args).items() if not k.startswith("_")
                         and k != "func"},
                "target_layer_ids": list(ids)}
    _run(args, model=draft, step_fn=step, eval_fn=evaluate, next_batch=next_batch,
         eval_batches=evals, extra_eval_args=(tstate,), format_eval=fmt, log_data=log_data)


def cmd_rollouts(args):
    from models.loading import load_target

    target = load_target(args.target, dtype=jnp.float32)
    corpus = train_data.load_corpus("train")
    rng = np.random.default_rng(args.seed)
    prompts = train_data.random_windows(corpus, rng, args.num, args.prompt_len)
    t0 = time.perf_counter()
    seqs = make_rollouts(target, prompts, args.gen_len, batch=args.batch, log=_log)
    np.save(args.out, seqs)
    _log(f"wrote {args.out}: {seqs.shape} in {(time.perf_counter() - t0) / 60:.1f} min")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q, *, lr, batch, seq_len, steps):
        q.add_argument("--out", required=True)
        q.add_argument("--steps", type=int, default=steps,
                       help="optimizer steps (with --minutes: the estimate that sets the warmup)")
        q.add_argument("--stop-after", type=int, default=0,
                       help="stop (and save) after this many steps of the --steps schedule")
        q.add_argument("--minutes", type=float, default=None,
                       help="time budget (wall clock, compile included): the warmup + cosine "
                            "schedule follows elapsed time instead of steps; the steps done are "
                            "logged (rerun with --steps N for a step-based equivalent)")
        q.add_argument("--batch", type=int, default=batch)
        q.add_argument("--seq-len", type=int, default=seq_len)
        q.add_argument("--lr", type=float, default=lr)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--log-every", type=int, default=25)
        q.add_argument("--eval-every", type=int, default=250)
        q.add_argument("--eval-batches", type=int, default=4)
        q.add_argument("--save-every", type=int, default=500)

    t = sub.add_parser("target", help="pre-train a small target LM on the stdlib corpus")
    common(t, lr=2e-3, batch=16, seq_len=256, steps=2000)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--hidden", type=int, default=192)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--kv-heads", type=int, default=2)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--intermediate", type=int, default=512)
    t.set_defaults(func=cmd_target)

    d = sub.add_parser("draft", help="train a DFlash drafter for a frozen target")
    common(d, lr=6e-4, batch=16, seq_len=128, steps=2000)
    d.add_argument("--target", required=True, help="target checkpoint directory")
    d.add_argument("--layers", type=int, default=3)
    d.add_argument("--intermediate", type=int, default=None, help="default: the target's")
    d.add_argument("--block-size", type=int, default=16)
    d.add_argument("--anchors", type=int, default=16, help="blocks per training sequence")
    d.add_argument("--gamma", type=float, default=None, help="loss decay (default 7 for bs16)")
    d.add_argument("--labels", choices=("argmax", "data"), default="argmax")
    d.add_argument("--num-features", type=int, default=3,
                   help="target layers read (evenly spaced, last included)")
    d.add_argument("--target-layers", default=None, help="explicit comma-separated layer ids")
    d.add_argument("--rollouts", default=None,
                   help=".npy of target greedy rollouts to train on (comma-separated: several)")
    d.add_argument("--init", default=None, help="start from this drafter checkpoint")
    d.add_argument("--anchor-min", type=int, default=None,
                   help="with --rollouts: earliest anchor position in a rollout (e.g. the "
                        "prompt length, to anchor only in generated text)")
    d.set_defaults(func=cmd_draft)

    r = sub.add_parser("rollouts", help="greedy continuations of corpus windows by the target")
    r.add_argument("--target", required=True)
    r.add_argument("--out", required=True, help=".npy file")
    r.add_argument("--num", type=int, default=1024)
    r.add_argument("--prompt-len", type=int, default=64)
    r.add_argument("--gen-len", type=int, default=192)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--seed", type=int, default=7)
    r.set_defaults(func=cmd_rollouts)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
