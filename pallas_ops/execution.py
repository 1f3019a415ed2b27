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

import dataclasses
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


def race_check_params(dma_execution_mode: str = "on_wait") -> pltpu.InterpretParams:
    """TPU-interpreter settings that record DMA / memory races instead of stopping at the first.

    Same jax 0.10.2 .. 0.12 behaviour: jax >= 0.11 raises inside the kernel on a race by default
    (``on_race="raise"``); here a race is reported (``on_race="warn"``) and recorded, so the caller
    checks `races_found()` after the kernel ran and can still compare its output. NaN-filled
    uninitialised memory and raising out-of-bounds reads as in `default_interpret_params`.
    """
    kw = {}
    if "on_race" in {f.name for f in dataclasses.fields(pltpu.InterpretParams)}:
        kw["on_race"] = "warn"
    return pltpu.InterpretParams(detect_races=True, dma_execution_mode=dma_execution_mode,
                                 uninitialized_memory="nan", out_of_bounds_reads="raise", **kw)


def races_found() -> bool:
    """Whether the last kernel run under `race_check_params` had a race.

    Raises RuntimeError if no kernel ran with race detection since the interpreter was reset (a
    check that did not run must not read as "no race").
    """
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc   # 0.10.2 .. 0.12

    # dispatch is asynchronous: wait until every launched kernel (its interpreter callbacks are
    # effects) has run, or the check could read the state before the kernel started
    jax.effects_barrier()
    if ipc.races is None:
        raise RuntimeError("no kernel ran with detect_races=True since the interpreter was reset")
    return bool(ipc.races.races_found)


def is_interpreted(interpret=None) -> bool:
    """Whether `resolve_interpret(interpret)` would run the kernel in the TPU interpreter."""
    return resolve_interpret(interpret) is not False
