"""The training loop shared by both commands: schedule by steps or minutes, eval, progress, saving.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx
from models.training.optim import set_lr, warmup_cosine


# ------------------------------------------------------------------------------------------------
# optimizer


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _bar(step, total, width=24):
    n = int(width * step / max(total, 1))
    return "[" + "#" * n + "." * (width - n) + "]"


def _save(model, out, log_data, dtype=None):
    from models.loading import save_checkpoint

    tmp = out.rstrip("/") + ".tmp"
    save_checkpoint(model, tmp, dtype=dtype)
    with open(os.path.join(tmp, "train_log.json"), "w") as f:
        json.dump(log_data, f, indent=1)
    if os.path.isdir(out):
        for name in os.listdir(out):
            os.remove(os.path.join(out, name))
        os.rmdir(out)
    os.rename(tmp, out)


def run(args, *, model, step_fn, eval_fn, next_batch, eval_batches, extra_eval_args,
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
        log(f"  eval @ {step}: " + " ".join(f"{k}={v}" for k, v in entry.items()
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
            log(f"{_bar(step, total)} {step}/{total} "
                 + " ".join(f"{n}={v:.4f}" for n, v in zip(names, m))
                 + f" lr={lr:.2e} {rate:.2f} step/s "
                 f"elapsed {el / 60:.1f}m eta {eta / 60:.1f}m")
        if args.eval_every and (step % args.eval_every == 0 or step in (total, stop)):
            run_eval(step)
        if args.save_every and step % args.save_every == 0 and step != total and step != stop:
            nnx.update(model, state)
            log_data["steps_done"] = step
            log_data["train_seconds"] = round(time.perf_counter() - t_start, 1)
            _save(model, args.out, log_data, getattr(args, "save_dtype", None))
    if args.eval_every and (not hist or hist[-1]["step"] != step):
        run_eval(step)          # the time budget can end between two logged steps
    nnx.update(model, state)
    log_data["steps_done"] = step
    log_data["train_seconds"] = round(time.perf_counter() - t_start, 1)
    _save(model, args.out, log_data, getattr(args, "save_dtype", None))
    log(f"saved {args.out} after {log_data['train_seconds'] / 60:.1f} min")
    return model
