"""Building blocks shared by the target and the draft: RMSNorm, RoPE (with Llama-3 scaling),
bias-free linear layers and the SwiGLU MLP (Flax NNX).

Weights are stored as `[in, out]` kernels (HF checkpoints store `[out, in]`; `models.loading`
transposes). Norms and RoPE compute in f32 and return the input dtype.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import RopeScaling


def _init(rngs: nnx.Rngs, shape, dtype, scale):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * scale).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel, kernel [in, out], no bias."""

    def __init__(self, d_in: int, d_out: int, *, dtype, rngs: nnx.Rngs, scale: float | None = None):
        scale = 1.0 / math.sqrt(d_in) if scale is None else scale
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), dtype, scale))

    def __call__(self, x):
        return jnp.einsum("...i,io->...o", x, self.kernel[...],
                          preferred_element_type=jnp.float32).astype(x.dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis (f32 statistics)."""

    def __init__(self, dim: int, *, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x, weight, eps):
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * h).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, *, dtype, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, intermediate, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64), with Llama-3 scaling when given."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotary embedding, HF 'rotate_half' convention.

    x: [..., n, heads, D]; positions: int [..., n]; inv_freq: [D // 2]. Returns x's dtype.
    """
    inv = jnp.asarray(inv_freq, jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv                  # [..., n, D/2]
    ang = jnp.concatenate([ang, ang], axis=-1)[..., None, :]               # [..., n, 1, D]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * cos + rot * sin).astype(x.dtype)


class Attention(nnx.Module):
    """The q/k/v/o projections (and the optional per-head q_norm/k_norm) of one layer.

    The attention itself is done by the caller through a kernel (paged or block attention).
    """

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 qk_norm: bool, eps: float, dtype, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden, num_heads * head_dim, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(num_heads * head_dim, hidden, dtype=dtype, rngs=rngs)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=eps, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=eps, dtype=dtype)
        else:
            self.q_norm = None
            self.k_norm = None

    # Head counts come from the weights (-1): under tensor parallelism a shard holds fewer heads.
    def query(self, x):
        q = self.q_proj(x).reshape(*x.shape[:-1], -1, self.head_dim)
        return self.q_norm(q) if self.q_norm is not None else q

    def key_value(self, x):
        k = self.k_proj(x).reshape(*x.shape[:-1], -1, self.head_dim)
        v = self.v_proj(x).reshape(*x.shape[:-1], -1, self.head_dim)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v

    def output(self, o):
        return self.o_proj(o.reshape(*o.shape[:-2], o.shape[-2] * self.head_dim))
