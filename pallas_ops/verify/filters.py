"""top-k / top-p / min-p for verify/accept: per-sequence parameters and the plain-jnp thresholds.

Every filter keeps {y >= threshold} of a row's tempered logits y = logits / T (semantics in
`reference/verify.py`), so a row's whole filter is one float32 threshold `tau` [B, bs] (-inf:
nothing filtered). The Gumbel-max sample and the accept test then run on y restricted to
{y >= tau}. `thresholds` is the sort-based jnp computation (the xla twin's); the Pallas path
finds the same thresholds among per-lane candidates, or by bisection (`filter_kernel`).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp


class Filters(NamedTuple):
    """Per sequence: top_k int32 [B] (0 = off), top_p f32 [B] (1 = off), min_p f32 [B] (0 = off)."""

    top_k: Any
    top_p: Any
    min_p: Any

    def active(self, samp):
        """bool [B]: the sequence samples (samp) and has some filter set."""
        return samp & ((self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0))


def filter_params(B, top_k, top_p, min_p) -> Filters | None:
    """Filters with the defaults filled in, or None when no filter argument is given."""
    if top_k is None and top_p is None and min_p is None:
        return None
    k = jnp.zeros((B,), jnp.int32) if top_k is None else jnp.asarray(top_k, jnp.int32)
    p = jnp.ones((B,), jnp.float32) if top_p is None else jnp.asarray(top_p, jnp.float32)
    m = jnp.zeros((B,), jnp.float32) if min_p is None else jnp.asarray(min_p, jnp.float32)
    return Filters(k, p, m)


def thresholds(logits, inv_t, samp, filt: Filters):
    """logits [B, bs, V]; inv_t f32 [B, bs] (1/T); samp bool [B] -> tau f32 [B, bs]: the kept set
    of row (b, j) is {logits * inv_t >= tau}; -inf for greedy or unfiltered rows. Sort-based."""
    B, bs, V = logits.shape
    y = logits.astype(jnp.float32) * inv_t[..., None]
    ys = -jnp.sort(-y, axis=-1)                                    # descending
    mx = ys[..., 0]
    k = filt.top_k[:, None]
    on_k = (k > 0) & (k < V)
    tau_k = jnp.take_along_axis(ys, jnp.clip(k - 1, 0, V - 1)[..., None], -1)[..., 0]
    tau_k = jnp.where(on_k, tau_k, -jnp.inf)
    # top-p over the top-k set: the largest value v with mass(y >= v) >= p * mass(y >= tau_k),
    # the value where the descending cumulative mass first reaches p * total (if that is inside
    # a run of equal values, the run's end reaches it too: the same value).
    m_safe = jnp.where(mx == -jnp.inf, 0.0, mx)
    w = jnp.where(ys >= tau_k[..., None], jnp.exp(ys - m_safe[..., None]), 0.0)
    cum = jnp.cumsum(w, axis=-1)
    total = cum[..., -1:]
    p = filt.top_p[:, None, None]
    reach = (cum >= p * total) & (ys >= tau_k[..., None])
    first = jnp.argmax(reach, axis=-1)
    tau_p = jnp.take_along_axis(ys, first[..., None], -1)[..., 0]
    tau_p = jnp.where((filt.top_p[:, None] < 1.0) & reach.any(-1), tau_p, -jnp.inf)
    mp = filt.min_p[:, None]
    tau_m = jnp.where(mp > 0.0, mx + jnp.log(jnp.where(mp > 0.0, mp, 1.0)), -jnp.inf)
    tau = jnp.maximum(jnp.maximum(tau_k, tau_p), tau_m)
    return jnp.where(samp[:, None], tau, -jnp.inf).astype(jnp.float32)


def keep(y, tau):
    """y [B, bs, V] f32 -> y on the kept set, -inf elsewhere (tau [B, bs])."""
    return jnp.where(y >= tau[..., None], y, -jnp.inf)

