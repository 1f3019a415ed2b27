"""Ahead-of-time compilation for real TPU generations on any host (no TPU needed).

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` describes a TPU slice and
`jax.jit(f).lower(...).compile()` runs the real Mosaic compiler for it: unsupported ops, bad
tilings and VMEM overflow fail here exactly as they would on hardware.

    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct((8, 128), jnp.float32), chip="v5p")

Array arguments are given as `jax.ShapeDtypeStruct`s (any other argument is passed through
unchanged, as with `jit(...).lower`); they are placed on the first device of the topology.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from pallas_ops.chips import CHIPS


class LibTpuUnavailable(RuntimeError):
    """libtpu (the `tpu` extra) is not installed, so TPU topologies cannot be described."""


def libtpu_available() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def tpu_device(chip: str):
    """The first device of the topology named for `chip` ('v5e', 'v5p', 'v6e')."""
    if chip not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; known: {sorted(CHIPS)}")
    if not libtpu_available():
        raise LibTpuUnavailable(
            "libtpu is not installed; install the 'tpu' extra (jax[tpu]) to AOT-compile for TPU"
        )
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(platform="tpu", topology_name=CHIPS[chip].topology)
    return desc.devices[0]


def _place(arg, device):
    if isinstance(arg, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(arg.shape, arg.dtype, sharding=SingleDeviceSharding(device))
    return arg


def lower_for_tpu(fn, *args, chip: str = "v5p", static_argnums=(), **kwargs):
    """`jax.jit(fn).lower(...)` with array specs placed on a `chip` device.

    Lowered under an abstract mesh of that device, so lowering-time queries of the chip
    (Pallas' `get_tpu_info`, e.g. in the lowering of `sign` / floor division, which jax's own
    TPU kernels use) see the target rather than this host's CPU.
    """
    device = tpu_device(chip)
    args = jax.tree.map(lambda a: _place(a, device), args,
                        is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
    kwargs = jax.tree.map(lambda a: _place(a, device), kwargs,
                          is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn, static_argnums=static_argnums).lower(*args, **kwargs)


def compile_for_tpu(fn, *args, chip: str = "v5p", static_argnums=(), **kwargs):
    """AOT-compile `fn` for `chip` through libtpu; returns the `jax.stages.Compiled`."""
    return lower_for_tpu(fn, *args, chip=chip, static_argnums=static_argnums, **kwargs).compile()
