"""The one execution policy shared by every kernel in `pallas_ops`.

A kernel never decides on its own whether it is compiled or interpreted: it calls
`resolve_interpret(interpret)` and passes the result to `pl.pallas_call(..., interpret=...)`.

- ``interpret=None`` (auto): compiled Mosaic when JAX's default backend is a TPU, otherwise the TPU
  interpreter with `default_interpret_params()` (simulated DMAs and semaphores, NaN-filled
  uninitialised memory, out-of-bounds reads raise).
- ``interpret=False``: force compilation (fails off TPU unless lowering AOT for a TPU topology).
- ``interpret=<pltpu.InterpretParams>``: the TPU interpreter with exactly those parameters.

``interpret=True`` (JAX's generic interpreter) is refused: it runs DMAs synchronously, hides races
and silently clamps out-of-range indices, so a kernel that passes under it proves little.
"""
from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import tpu as pltpu

InterpretArg = "None | bool | pltpu.InterpretParams"


def default_interpret_params() -> pltpu.InterpretParams:
    """The interpreter settings used off TPU when the caller does not choose."""
    return pltpu.InterpretParams(
        dma_execution_mode="on_wait",
        uninitialized_memory="nan",
        out_of_bounds_reads="raise",
    )


@functools.lru_cache(maxsize=None)
def _backend_is_tpu() -> bool:
    try:
        return jax.default_backend() == "tpu"
    except RuntimeError:  # no backend could be initialised at all
        return False


def on_tpu() -> bool:
    """True when JAX's default backend is a TPU (kernels then run compiled)."""
    return _backend_is_tpu()


def resolve_interpret(interpret=None):
    """Map a kernel's ``interpret=`` argument to what `pl.pallas_call` takes.

    Returns ``False`` (compile with Mosaic) or a `pltpu.InterpretParams`.
    """
    if interpret is None:
        return False if on_tpu() else default_interpret_params()
    if interpret is False:
        return False
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    if interpret is True:
        raise ValueError(
            "interpret=True selects JAX's generic interpreter, which hides DMA races and clamps "
            "out-of-range indices; pass None (auto), False (compile) or a "
            "pltpu.InterpretParams(...) instead"
        )
    raise TypeError(
        f"interpret must be None, False or pltpu.InterpretParams, got {type(interpret).__name__}"
    )


def is_interpreted(interpret=None) -> bool:
    """Whether `resolve_interpret(interpret)` would run the kernel in the TPU interpreter."""
    return resolve_interpret(interpret) is not False
