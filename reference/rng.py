"""NumPy twin of `pallas_ops.rng`: the same 32-bit words bit for bit, then float64 logarithms.

See `pallas_ops/rng.py` for the definition of the stream.
"""
from __future__ import annotations

import numpy as np

STREAM_GUMBEL = 0
STREAM_ACCEPT = 1
STREAM_DRAFT = 2

FMIX_M1 = np.uint32(0x85EBCA6B)
FMIX_M2 = np.uint32(0xC2B2AE35)
STREAM_MUL = 0x632BE5AB
POSITION_MUL = np.uint32(0x9E3779B9)
INDEX_MUL = np.uint32(0x27D4EB2F)


def _u32(x) -> np.ndarray:
    """int32 / Python ints -> uint32 with the same low 32 bits."""
    return (np.asarray(x).astype(np.int64) & 0xFFFFFFFF).astype(np.uint32)


def fmix32(h: np.ndarray) -> np.ndarray:
    h = np.asarray(h, np.uint32)
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = (h * FMIX_M1).astype(np.uint32)
        h = h ^ (h >> np.uint32(13))
        h = (h * FMIX_M2).astype(np.uint32)
        h = h ^ (h >> np.uint32(16))
    return h


def row_key(seed, position, stream: int = STREAM_GUMBEL) -> np.ndarray:
    """uint32 key of (seed, position, stream)."""
    s = np.uint32(((stream + 1) * STREAM_MUL) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        h = fmix32(_u32(seed) ^ s)
        return fmix32(h ^ (_u32(position) * POSITION_MUL).astype(np.uint32))


def bits(key, index) -> np.ndarray:
    """uint32 random word of (key, vocab index)."""
    with np.errstate(over="ignore"):
        return fmix32(np.asarray(key, np.uint32) ^ (_u32(index) * INDEX_MUL).astype(np.uint32))


def uniform(b) -> np.ndarray:
    """float64 uniform in (0, 1): ((b >> 9) + 0.5) * 2**-23 (same value as the float32 one)."""
    return ((np.asarray(b, np.uint32) >> np.uint32(9)).astype(np.float64) + 0.5) * 2.0 ** -23


def gumbel(b) -> np.ndarray:
    return -np.log(-np.log(uniform(b)))


def gumbel_noise(seed, position, index, stream: int = STREAM_GUMBEL) -> np.ndarray:
    return gumbel(bits(row_key(seed, position, stream), index))
