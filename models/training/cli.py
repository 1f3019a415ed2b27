"""Training in JAX: small target LMs (for demos) and DFlash drafters for a frozen target.

    python -m models.training target --out DIR [--layers 5 --hidden 192 ...] --steps N
    python -m models.training rollouts --target DIR --out FILE.npy --num N [--prompt-len P --gen-len G]
    python -m models.training draft --target DIR --out DIR [--layers 3 --block-size 16]
        [--labels argmax|data] [--rollouts FILE.npy] --steps N

Both use AdamW with linear warmup + cosine decay and global-norm clipping (optax). Progress lines
go to stderr; held-out metrics every --eval-every steps; the checkpoint is rewritten every
--save-every steps and at the end (with `train_log.json`: arguments, timings and metrics).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.training import data as train_data
from models.config import DraftConfig, TargetConfig
from models.draft import DraftModel
from models.target import TargetModel

# ------------------------------------------------------------------------------------------------
# optimizer
from models.training.loop import log, run
from models.training.objectives import (block_weights, make_draft_step, make_target_step,
                                        sample_anchors)
from models.training.optim import make_host_lr_optimizer
from models.training.rollouts import make_rollouts


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
    run(args, model=model, step_fn=step, eval_fn=evaluate,
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
    run(args, model=draft, step_fn=step, eval_fn=evaluate, next_batch=next_batch,
         eval_batches=evals, extra_eval_args=(tstate,), format_eval=fmt, log_data=log_data)


def cmd_rollouts(args):
    from models.loading import load_target

    target = load_target(args.target, dtype=jnp.float32)
    corpus = train_data.load_corpus("train")
    rng = np.random.default_rng(args.seed)
    prompts = train_data.random_windows(corpus, rng, args.num, args.prompt_len)
    t0 = time.perf_counter()
    seqs = make_rollouts(target, prompts, args.gen_len, batch=args.batch, log=log)
    np.save(args.out, seqs)
    log(f"wrote {args.out}: {seqs.shape} in {(time.perf_counter() - t0) / 60:.1f} min")


def build_parser():
    p = argparse.ArgumentParser(prog="python -m models.training", description=__doc__,
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
        q.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32",
                       help="dtype of the saved weights (training itself runs in float32)")

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
