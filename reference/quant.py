"""NumPy twin of `pallas_ops.quant`: per (head, token) absmax quantization, bit for bit.

Used to check what `write_kv_pages` / `append_context` store, and to dequantize a cache for the
float64 attention references (the kernels must agree with attention over the dequantized cache).
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
_NP = {"int8": np.int8, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
       "float8_e5m2": ml_dtypes.float8_e5m2, "float32": np.float32,
       "bfloat16": ml_dtypes.bfloat16}


def quantize(x, dtype: str, *, scale_dtype: str = "float32"):
    """x [..., D] -> (values [..., D] of `dtype`, scales [...] of `scale_dtype`), in f32 math."""
    qmax = np.float32(QMAX[dtype])
    x = np.asarray(x, np.float32)
    scale = (np.max(np.abs(x), axis=-1) * np.float32(1.0 / float(qmax))).astype(_NP[scale_dtype])
    s32 = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(s32 > 0, x / np.where(s32 > 0, s32, np.float32(1)), np.float32(0))
    if dtype == "int8":
        y = np.rint(y)
    y = np.clip(y, -qmax, qmax).astype(np.float32)
    return y.astype(_NP[dtype]), scale


def dequantize(values, scales):
    """values [..., D], scales [...] -> float64 values * scales."""
    return (np.asarray(values).astype(np.float64)
            * np.asarray(scales).astype(np.float64)[..., None])
