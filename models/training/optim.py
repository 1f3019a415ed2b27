"""AdamW with warmup + cosine (optax), and a host-set learning rate for time-budgeted runs.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax


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
