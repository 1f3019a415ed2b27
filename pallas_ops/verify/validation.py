"""Static checks of `verify_accept`'s arguments (shapes, dtypes), shared by the kernel and its twin."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16)


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _dtype(x):
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _concrete(x):
    """x as a NumPy array when its values are known now (not a tracer), else None."""
    try:
        return np.asarray(x)
    except Exception:   # a tracer: values are checked only when known
        return None


def _check_per_sequence(B, named):
    """(name, array | None, dtype kind) triples: each given array is [B] of that kind."""
    for name, arr, kind in named:
        if arr is None:
            continue
        if _shape(arr) != (B,):
            raise ValueError(f"{name} must have shape [B] = {(B,)}, got {_shape(arr)}")
        if not jnp.issubdtype(_dtype(arr), kind):
            raise ValueError(f"{name} has dtype {_dtype(arr)}, expected {kind.__name__}")


def check_filters(B, V, temperature, top_k, top_p, min_p, return_logprobs, top_logprobs,
                  vocab_axis_name):
    """Shapes, dtypes and (when concrete) values of the sampling filters and logprobs options."""
    named = (("top_k", top_k, jnp.integer), ("top_p", top_p, jnp.floating),
             ("min_p", min_p, jnp.floating))
    _check_per_sequence(B, named)
    for name, arr, _ in named:
        if arr is None:
            continue
        val = _concrete(arr)
        if val is None:
            continue
        if name == "top_k" and (val < 0).any():
            raise ValueError(f"top_k must be >= 0 (0 = off), got {val.tolist()}")
        if name == "top_p" and not ((val > 0) & (val <= 1)).all():
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {val.tolist()}")
        if name == "min_p" and not ((val >= 0) & (val < 1)).all():
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {val.tolist()}")
    filtered = any(a is not None for a in (top_k, top_p, min_p))
    if filtered and vocab_axis_name is not None:
        raise ValueError("top_k / top_p / min_p are not supported with vocab_axis_name (the "
                         "thresholds would need the whole row): gather the vocabulary first")
    if not isinstance(return_logprobs, (bool, np.bool_)):
        raise ValueError(f"return_logprobs must be a bool, got {return_logprobs!r}")
    if not isinstance(top_logprobs, (int, np.integer)) or not 0 <= int(top_logprobs) <= 20:
        raise ValueError(f"top_logprobs must be an int in [0, 20], got {top_logprobs!r}")
    if top_logprobs and not return_logprobs:
        raise ValueError("top_logprobs needs return_logprobs=True")
    if top_logprobs and vocab_axis_name is not None:
        raise ValueError("top_logprobs is not supported with vocab_axis_name")
    if int(top_logprobs) > V:
        raise ValueError(f"top_logprobs={top_logprobs} exceeds the vocabulary V={V}")


def check_args(logits, draft_tokens, temperature, seed, position, draft_probs, num_seqs, *,
               top_k=None, top_p=None, min_p=None, return_logprobs=False, top_logprobs=0,
               vocab_axis_name=None):
    """Static checks (shapes, dtypes; filter values when concrete); raises ValueError naming the
    argument. Returns (B, bs, V)."""
    shape = _shape(logits)
    if len(shape) != 3:
        raise ValueError(f"logits must be [B, bs, V], got shape {shape}")
    B, bs, V = shape
    if B < 1 or bs < 1 or V < 1:
        raise ValueError(f"logits must have B, bs, V >= 1, got shape {shape}")
    if _dtype(logits) not in [jnp.dtype(d) for d in _FLOAT_DTYPES]:
        raise ValueError(f"logits must be float32 or bfloat16, got {_dtype(logits)}")
    if V >= 2 ** 31 - 1:
        raise ValueError(f"logits vocabulary {V} does not fit int32 indices")
    if _shape(draft_tokens) != (B, bs - 1):
        raise ValueError(f"draft_tokens must be int32 [B, bs-1] = {(B, bs - 1)}, "
                         f"got {_shape(draft_tokens)}")
    if not jnp.issubdtype(_dtype(draft_tokens), jnp.integer):
        raise ValueError(f"draft_tokens must be an integer array, got {_dtype(draft_tokens)}")
    _check_per_sequence(B, (("temperature", temperature, jnp.floating),
                            ("seed", seed, jnp.integer), ("position", position, jnp.integer)))
    if temperature is not None and seed is None:
        raise ValueError("seed is required when temperature is given (sampling rows need a key)")
    if draft_probs is not None:
        if _shape(draft_probs) != (B, bs - 1, V):
            raise ValueError(f"draft_probs must be [B, bs-1, V] = {(B, bs - 1, V)}, "
                             f"got {_shape(draft_probs)}")
        if not jnp.issubdtype(_dtype(draft_probs), jnp.floating):
            raise ValueError(f"draft_probs must be floating point, got {_dtype(draft_probs)}")
    if num_seqs is not None:
        if isinstance(num_seqs, (int, np.integer)):
            if not 0 <= int(num_seqs) <= B:
                raise ValueError(f"num_seqs must be in [0, B={B}], got {num_seqs}")
        elif _shape(num_seqs) not in ((), (1,)):
            raise ValueError(f"num_seqs must be an int or an int32 scalar, got shape "
                             f"{_shape(num_seqs)}")
    check_filters(B, V, temperature, top_k, top_p, min_p, return_logprobs, top_logprobs,
                  vocab_axis_name)
    return B, bs, V
