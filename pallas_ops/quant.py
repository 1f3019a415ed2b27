"""Quantized KV caches: per (KV head, token) absmax scales, shared by both attention kernels.

A quantized cache stores values in int8, float8_e4m3fn or float8_e5m2 and, beside them, one
scale per KV head and token (f32 or bf16): the real value is ``stored value * scale``. New tokens
are quantized per token and head over the head dim::

    scale = absmax(x) * (1 / QMAX[dtype])      (f32 product, rounded to the scale dtype)
    value = saturate(round_to_nearest(x / scale))   (x / scale computed in f32)

A token of all zeros gets scale 0 and values 0. `reference.quant` is the NumPy twin (bit for bit).

Why the scales stay beside the pages and are moved by XLA: a TPU DMA moves contiguous runs of a
multiple of 512 bytes, and one page's scales of one head are ``page_size * 4`` bytes (64 bytes
for pages of 16 tokens), so they cannot be DMA'd page by page the way the values are. The
kernels read them as lane vectors over a KV block's keys and fold them into the math: a K scale
per key scales a score column, a V scale per key scales p before p.V (f32 throughout).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KV_CACHE_DTYPES = ("int8", "float8_e4m3fn", "float8_e5m2")
QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
SCALE_DTYPES = ("float32", "bfloat16")
PLAIN_DTYPES = ("float32", "bfloat16")


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def is_quantized(dtype) -> bool:
    """True for the cache dtypes that carry scales (int8 and the two fp8 formats)."""
    return dtype_name(dtype) in KV_CACHE_DTYPES


def quantize(x, dtype, *, scale_dtype=jnp.float32):
    """Per-row absmax quantization over the last axis.

    x: [..., D] float -> (values [..., D] in `dtype`, scales [...] in `scale_dtype`).
    """
    name = dtype_name(dtype)
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"dtype must be one of {KV_CACHE_DTYPES}, got {name}")
    qmax = QMAX[name]
    x = jnp.asarray(x).astype(jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1)
    scale = (absmax * jnp.float32(1.0 / qmax)).astype(scale_dtype)
    s32 = scale.astype(jnp.float32)[..., None]
    # XLA rewrites x / broadcast(s) as x * broadcast(1 / s), which is not correctly rounded (it
    # moves x / s off a .5 tie, then int8 / fp8 rounding disagrees with reference.quant): divide
    # by a materialised divisor the simplifier cannot see through.
    div = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.where(s32 > 0, s32, 1.0), x.shape))
    y = jnp.where(s32 > 0, x / div, 0.0)
    if name == "int8":
        y = jnp.round(y)
    y = jnp.clip(y, -qmax, qmax)
    return y.astype(dtype), scale


def dequantize(values, scales):
    """values [..., D] (quantized), scales [...] -> f32 [..., D] = values * scales."""
    return values.astype(jnp.float32) * scales.astype(jnp.float32)[..., None]


__all__ = ["KV_CACHE_DTYPES", "QMAX", "SCALE_DTYPES", "dequantize", "is_quantized", "quantize"]
