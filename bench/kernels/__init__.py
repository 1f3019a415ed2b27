"""One bench module per kernel (and per peer kernel), and how the benchmarks find them.

A module `bench/kernels/NAME.py` provides `build(shape, *, chip) -> (fn, args)`, `hbm_bytes(shape)`,
`main_loop(shape, *, chip) -> bench.static.MainLoop`, optionally `shapes()` (CONTRIBUTING.md); for
the wall-clock suite `bench/micro/` also `concrete_args(shape)` (arrays for fn), `build(...,
interpret=)` (our kernels: None runs them in the TPU interpreter off TPU) and `flops(shape)` where
the kernel does matmul work.
"""
from __future__ import annotations

import importlib
import importlib.metadata

# Kernels `bench static --all` looks for, as `bench/kernels/<name>.py`; a missing one is skipped
# (peer_rpa_v3, peer_tpu_sampler and peer_rpa_v3_draft need tpu-inference, peer_tokamax_rpa
# tokamax: not dependencies, see their docstrings and `make peers`).
KERNELS = ("paged", "ragged", "block", "verify", "verify_filters", "peer_jax_paged",
           "peer_jax_ragged", "peer_rpa_v3", "peer_tokamax_rpa", "peer_tpu_sampler",
           "peer_rpa_v3_draft")


def load_module(kernel: str):
    """`bench.<kernel>`, or None with a reason if it is not there (yet) or lacks `build`."""
    try:
        mod = importlib.import_module(f"bench.kernels.{kernel}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.kernels.{kernel}",):
            return None, f"bench/kernels/{kernel}.py not present yet"
        return None, f"bench/kernels/{kernel}.py failed to import: {e}"
    except Exception as e:  # noqa: BLE001 - a half-written module must not stop the table
        return None, f"bench/kernels/{kernel}.py failed to import: {type(e).__name__}: {e}"
    if not hasattr(mod, "build"):
        return None, f"bench/kernels/{kernel}.py has no build(shape, *, chip)"
    return mod, ""


def kernel_shapes(kernel: str, mod=None) -> list:
    """The shapes a kernel runs at: its module's `shapes()` if it has one, else the catalogue's."""
    if mod is not None and hasattr(mod, "shapes"):
        return list(mod.shapes())
    from bench import shapes

    return list(shapes.CATALOGUE.get(kernel, []))


def find_shape(kernel: str, name: str, mod=None):
    for s in kernel_shapes(kernel, mod):
        if s.name == name:
            return s
    raise KeyError(f"no shape {name!r} for {kernel}; known: "
                   f"{[s.name for s in kernel_shapes(kernel, mod)]}")


def require_peer(load, package: str) -> None:
    """Run a peer module's loader at import; a missing distribution becomes ModuleNotFoundError
    (name=package), which `bench static` reports as a skipped kernel."""
    try:
        load()
    except importlib.metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(f"{package} is not installed ({e}); see the peer module's "
                                  "docstring and `make peers`", name=package) from None


def shape_finder(kernel: str, shapes):
    """find(name) over a module's shapes() (KeyError naming the known ones)."""
    def find(name: str):
        for s in shapes():
            if s.name == name:
                return s
        raise KeyError(f"no shape {name!r} for {kernel}; known: {[s.name for s in shapes()]}")
    return find
