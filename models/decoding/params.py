"""Per-request sampling parameters of `generate`: validation and the per-slot arrays.

temperature, top_k, top_p and min_p may each be one value for every prompt or a sequence with one
value per prompt. Checked here, before anything runs (ValueError naming the argument, and the
prompt for a per-prompt value):

    temperature  finite, >= 0 (0 = greedy)
    top_k        int >= 0 (0 = off)
    top_p        in (0, 1] (1 = off)
    min_p        in [0, 1) (0 = off)

None means off. The filters apply to sampling sequences (T > 0) only, as `verify_accept`'s.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np

# name -> (off value, dtype, check, what the check requires)
_SPECS = {
    "temperature": (0.0, np.float32, lambda v: math.isfinite(v) and v >= 0,
                    "a finite number >= 0"),
    "top_k": (0, np.int32, lambda v: 0 <= v < 2 ** 31, "an int >= 0 (0 = off)"),
    "top_p": (1.0, np.float32, lambda v: 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    "min_p": (0.0, np.float32, lambda v: 0 <= v < 1, "a number in [0, 1) (0 = off)"),
}


def _scalar_ok(name, v) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return False
    if name == "top_k":
        return isinstance(v, numbers.Integral)
    return isinstance(v, numbers.Real)


def per_prompt(name: str, value, n: int) -> np.ndarray:
    """`value` (None, one value, or n values) -> a checked array [n] (None: the off value)."""
    off, dtype, check, want = _SPECS[name]
    if value is None:
        return np.full(n, off, dtype)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if _scalar_ok(name, value) or isinstance(value, (bool, np.bool_)):
        if not _scalar_ok(name, value) or not check(value):
            raise ValueError(f"{name} must be {want}, got {value!r}")
        return np.full(n, value, dtype)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ValueError(f"{name} must be {want}, or a sequence with one such value per prompt, "
                         f"got {value!r}")
    values = list(value.tolist() if isinstance(value, np.ndarray) else value)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} prompts (give one value for "
                         f"all prompts, or one per prompt)")
    for i, v in enumerate(values):
        if not _scalar_ok(name, v) or not check(v):
            raise ValueError(f"{name}[{i}] (prompt {i}) must be {want}, got {v!r}")
    return np.asarray(values, dtype)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per request (arrays [n]): temperature, top_k, top_p, min_p, seeds; logprobs: whether to
    report each token's log-probability."""
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    min_p: np.ndarray
    seeds: np.ndarray
    logprobs: bool = False

    @classmethod
    def build(cls, n: int, *, temperature: Any = 0.0, top_k: Any = None, top_p: Any = None,
              min_p: Any = None, seed: int = 0, logprobs: bool = False) -> "SamplingParams":
        """Checked parameters of n prompts. Sequence seeds derive from `seed` and the prompt's
        index (so outputs do not depend on batch layout)."""
        if not isinstance(seed, numbers.Integral) or isinstance(seed, (bool, np.bool_)):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(logprobs, (bool, np.bool_)):
            raise ValueError(f"logprobs must be a bool, got {logprobs!r}")
        seeds = np.array([(int(seed) * 1_000_003 + i) % (2 ** 31 - 1) for i in range(n)],
                         np.int32)
        return cls(per_prompt("temperature", temperature, n), per_prompt("top_k", top_k, n),
                   per_prompt("top_p", top_p, n), per_prompt("min_p", min_p, n), seeds,
                   bool(logprobs))

    @property
    def greedy(self) -> bool:
        """Every request greedy (T = 0)."""
        return not (self.temperature > 0).any()

    @property
    def any_filter_set(self) -> bool:
        """Some request has a filter value other than off (whatever its temperature)."""
        return bool(((self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0)).any())

    @property
    def filtered(self) -> bool:
        """Some sampling request (T > 0) has a filter on: the step functions' filtered variant."""
        on = (self.top_k > 0) | (self.top_p < 1) | (self.min_p > 0)
        return bool((on & (self.temperature > 0)).any())

    def per_slot(self, slot_req, size: int | None = None) -> dict:
        """Arrays [len(slot_req)] (or [size]) of slot s's request slot_req[s] (-1 = free: greedy,
        filters off, seed 0): temp, seeds, top_k, top_p, min_p."""
        req = np.asarray(slot_req, np.int64)
        if size is not None:
            req = np.pad(req, (0, size - len(req)), constant_values=-1)
        live = req >= 0
        r = np.where(live, req, 0)
        pick = lambda a, off: np.where(live, a[r], off).astype(a.dtype)   # noqa: E731
        return dict(temp=pick(self.temperature, 0.0), seeds=pick(self.seeds, 0),
                    top_k=pick(self.top_k, 0), top_p=pick(self.top_p, 1.0),
                    min_p=pick(self.min_p, 0.0))
