"""Counter-based random numbers for sampling, computable in-register inside a Pallas TPU kernel.

The stream is a pure function of (seed, position, vocab index, stream id): no state, no key
splitting, so a kernel tile, the plain-jnp backend and the NumPy reference (`reference/rng.py`,
bit for bit on the integer part) all see the same numbers, whatever the batch order or padding.

Definition (all arithmetic on 32-bit words, wrapping; ``>>`` is a logical shift)::

    fmix32(h)   = murmur3's finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
                                       h *= 0xC2B2AE35; h ^= h >> 16
    row_key(seed, position, stream)
                = fmix32(fmix32(seed ^ ((stream + 1) * 0x632BE5AB)) ^ (position * 0x9E3779B9))
    bits(key, index)
                = fmix32(key ^ (index * 0x27D4EB2F))
    uniform(b)  = ((b >> 9) + 0.5) * 2**-23          # in (0, 1), 2**23 levels, exact in f32
    gumbel(u)   = -log(-log(u))                      # in [-2.80, 16.64]

For a fixed key, index -> bits is a bijection (odd multiply, xor and fmix32 are all bijective), so
the noise of one row never repeats inside the row. `uniform` is exact in float32 and float64
(a 23-bit integer plus one half, times a power of two), so the reference and the kernel agree on u
bit for bit; only the logarithms round differently.

Streams: `STREAM_GUMBEL` (0) keys the Gumbel noise of the token samples; `STREAM_ACCEPT` (1) keys
the uniform of the accept test of the draft_probs path (drawn at vocab index 0); `STREAM_DRAFT`
(2) keys the Gumbel noise of drafts sampled from the draft model's own distribution
(`models.sampling.draft_sample`), independent of the target's.

Everything is written on int32 values (wrapping multiply, `lax.shift_right_logical`), which Mosaic
compiles for v5e/v5p/v6e; the functions work on any broadcastable jnp arrays, inside a kernel or out.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

STREAM_GUMBEL = 0
STREAM_ACCEPT = 1
STREAM_DRAFT = 2

FMIX_M1 = 0x85EBCA6B
FMIX_M2 = 0xC2B2AE35
STREAM_MUL = 0x632BE5AB
POSITION_MUL = 0x9E3779B9
INDEX_MUL = 0x27D4EB2F
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0 ** -23


def _i32(c: int) -> int:
    """A uint32 constant as the int32 with the same bits."""
    c &= 0xFFFFFFFF
    return c - (1 << 32) if c >= (1 << 31) else c


def _srl(x, n: int):
    return lax.shift_right_logical(x, jnp.int32(n))


def fmix32(h):
    """murmur3 finaliser on int32 words (bits as uint32)."""
    h = h ^ _srl(h, 16)
    h = h * jnp.int32(_i32(FMIX_M1))
    h = h ^ _srl(h, 13)
    h = h * jnp.int32(_i32(FMIX_M2))
    h = h ^ _srl(h, 16)
    return h


def row_key(seed, position, stream: int = STREAM_GUMBEL):
    """int32 key of one (seed, position, stream); seed/position int32 arrays (broadcast)."""
    seed = jnp.asarray(seed, jnp.int32)
    position = jnp.asarray(position, jnp.int32)
    h = fmix32(seed ^ jnp.int32(_i32((stream + 1) * STREAM_MUL)))
    return fmix32(h ^ (position * jnp.int32(_i32(POSITION_MUL))))


def bits(key, index):
    """int32 random word (uint32 bits) of (key, vocab index)."""
    return fmix32(key ^ (jnp.asarray(index, jnp.int32) * jnp.int32(_i32(INDEX_MUL))))


def uniform(b):
    """float32 uniform in (0, 1) from random words: ((b >>> 9) + 0.5) * 2**-23.

    Computed as bitcast((b >>> 9) | 0x3F800000) - (1 - 2**-24): the float 1 + k * 2**-23 minus a
    constant, exact (Sterbenz), so the same value in two vector ops (shift|or, subtract) instead
    of four (shift, convert, add, multiply)."""
    one_plus = lax.bitcast_convert_type(_srl(b, UNIFORM_SHIFT) | jnp.int32(0x3F800000),
                                        jnp.float32)
    return one_plus - jnp.float32(1.0 - 2.0 ** -24)


def gumbel(b):
    """float32 standard Gumbel noise from random words."""
    return -jnp.log(-jnp.log(uniform(b)))


def bits_premul(key, index_times_mul):
    """bits(key, index) given index * INDEX_MUL (wrapping int32): lets a kernel step the index
    product by a constant instead of multiplying per element."""
    return fmix32(key ^ index_times_mul)


def gumbel_noise(seed, position, index, stream: int = STREAM_GUMBEL):
    """Convenience: gumbel(bits(row_key(seed, position, stream), index))."""
    return gumbel(bits(row_key(seed, position, stream), index))
