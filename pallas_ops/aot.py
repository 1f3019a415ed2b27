"""Ahead-of-time compilation for real TPU generations on any host (no TPU needed).

With libtpu installed (the `tpu` extra), `jax.experimental.topologies` describes a TPU slice and
`jax.jit(f).lower(...).compile()` runs the real Mosaic compiler for it: unsupported ops, bad
tilings and VMEM overflow fail here exactly as they would on hardware.

    compiled = compile_for_tpu(fn, jax.ShapeDtypeStruct((8, 128), jnp.float32), chip="v5p")

Array arguments are given as `jax.ShapeDtypeStruct`s (any other argument is passed through
unchanged, as with `jit(...).lower`); they are placed on the first device of the topology.

Sharded programs for a multi-chip slice (the slice need not be attached, nor be one host's):

    mesh = tpu_mesh("v5p:2x2x1", {"data": 1, "model": 4})
    w = sharded_spec((1024, 4096), jnp.bfloat16, mesh, P(None, "model"))
    compiled = compile_sharded(fn, x, w, mesh=mesh)

`tpu_slice_devices(topology)` gives the devices of a named slice. Names libtpu accepts
(checked with jax 0.12.0.1 / libtpu 0.0.50.1 and jax 0.10.2 / libtpu 0.0.42.1): "v5p:2x2x1"
(4 chips), "v5p:2x2x2", "v5p:2x4x1" and "v5p:4x2x1" (8 chips: 2 hosts of 4), "v6e:2x2" (4),
"v6e:2x4" and "v6e:4x2" (8), "v5e:2x2" and "v5e:2x4". Each v5p chip is one JAX device (its 2
TensorCores run as a megacore). Shapes not divisible into 2x2x1 hosts ("v5p:1x1x1",
"v6e:1x1", "v5p:1x2x4") are refused by libtpu 0.0.42.1 and accepted by 0.0.50.1; names of the
form "v5p-8" are refused by both (the pattern is `<kind>[:=_]<AxB[xC]>`). An 8-chip slice is two
hosts (its devices carry process_index 0 and 1); this one process compiles for all of them.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

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


# -- sharded programs for a multi-chip slice --------------------------------------------------


def _require_libtpu() -> None:
    if not libtpu_available():
        raise LibTpuUnavailable(
            "libtpu is not installed; install the 'tpu' extra (jax[tpu]) to AOT-compile for TPU"
        )


@functools.lru_cache(maxsize=None)
def _slice_devices(topology: str) -> tuple:
    _require_libtpu()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:   # libtpu's INVALID_ARGUMENT arrives as a JaxRuntimeError
        raise ValueError(f"libtpu does not accept the topology {topology!r}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return tuple(desc.devices)


def tpu_slice_devices(topology: str) -> list:
    """All devices of the TPU slice named `topology` ("v5p:2x2x1" -> 4 devices), compile-only.

    A bare chip name ('v5e', 'v5p', 'v6e') means that chip's entry in `CHIPS` (its 4-chip slice).
    ValueError for a name libtpu refuses (see this module's docstring for the accepted ones).
    """
    if not isinstance(topology, str) or not topology:
        raise ValueError(f"a topology is a name such as 'v5p:2x2x1', not {topology!r}")
    if topology in CHIPS:
        topology = CHIPS[topology].topology
    return list(_slice_devices(topology))


def tpu_mesh(topology: str, axis_sizes: dict[str, int]) -> jax.sharding.Mesh:
    """A `Mesh` over every device of `topology`, its axes named and sized as in `axis_sizes`.

    `tpu_mesh("v5p:2x2x1", {"data": 1, "model": 4})`. The product of the sizes must equal the
    slice's device count (ValueError otherwise). Devices are laid out by jax's topology-aware
    `jax.experimental.topologies.make_mesh` (so a mesh axis follows the chips' ICI links where it
    can); a shape that function cannot lay out falls back to the devices in id order.
    """
    from jax.experimental import topologies

    if not axis_sizes:
        raise ValueError("axis_sizes must name at least one mesh axis")
    names = tuple(axis_sizes)
    sizes = tuple(axis_sizes.values())
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"mesh axis names must be non-empty strings, got {names!r}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in sizes):
        raise ValueError(f"mesh axis sizes must be positive ints, got {dict(axis_sizes)!r}")
    devices = tpu_slice_devices(topology)
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh axis sizes {dict(axis_sizes)} multiply to {int(np.prod(sizes))}, "
                         f"but {topology!r} has {len(devices)} devices")
    try:
        return topologies.make_mesh(topologies.TopologyDescription(devices), sizes, names)
    except (ValueError, NotImplementedError, AssertionError):
        ordered = sorted(devices, key=lambda d: d.id)
        return jax.sharding.Mesh(np.array(ordered, dtype=object).reshape(sizes), names)


def sharded_spec(shape, dtype, mesh: jax.sharding.Mesh, spec=None) -> jax.ShapeDtypeStruct:
    """`jax.ShapeDtypeStruct(shape, dtype)` sharded as `PartitionSpec` `spec` over `mesh`
    (default: replicated). `spec` may be a `PartitionSpec` or a tuple of its entries."""
    if spec is None:
        spec = PartitionSpec()
    elif not isinstance(spec, PartitionSpec):
        spec = PartitionSpec(*spec)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def _describe(mesh: jax.sharding.Mesh) -> str:
    devices = list(mesh.devices.flat)
    kind = getattr(devices[0], "device_kind", "?") if devices else "?"
    return f"{dict(mesh.shape)} of {kind!r}, device ids {[d.id for d in devices]}"


def _check_on_mesh(tree, mesh: jax.sharding.Mesh, what: str) -> None:
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))[0]
    for path, leaf in leaves:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            continue
        where = what + jax.tree_util.keystr(path)
        sharding = leaf.sharding
        if not isinstance(sharding, NamedSharding):
            raise ValueError(
                f"{where}: a ShapeDtypeStruct for lower_sharded must carry a NamedSharding over "
                f"the mesh (e.g. sharded_spec(shape, dtype, mesh, P(...))), got {sharding!r}")
        if (sharding.mesh.axis_names != mesh.axis_names
                or sharding.mesh.devices.shape != mesh.devices.shape
                or list(sharding.mesh.devices.flat) != list(mesh.devices.flat)):
            raise ValueError(f"{where}: its NamedSharding is over another mesh "
                             f"({_describe(sharding.mesh)}) than the one given ({_describe(mesh)})")


def lower_sharded(fn, *args, mesh: jax.sharding.Mesh, static_argnums=(), **kwargs):
    """`jax.jit(fn).lower(*args, **kwargs)` for the TPU slice of `mesh` (see `tpu_mesh`).

    Every `jax.ShapeDtypeStruct` in `args` / `kwargs` (pytrees) must already carry a
    `NamedSharding` over `mesh` (`sharded_spec` makes one): it fixes how the global array is
    split, and the compiled program's parameters are the per-device shards. ValueError otherwise.
    Anything else is passed through unchanged. `fn` may use `jax.shard_map(..., mesh=mesh)`,
    sharding constraints, or leave partitioning to XLA; a Pallas kernel must sit inside a
    shard_map (jax refuses to partition a Mosaic kernel automatically).

    Lowered under `mesh`'s abstract mesh, as `lower_for_tpu` does for one device, so
    lowering-time queries of the chip (Pallas' `get_tpu_info`) see the TPU, not this host.
    """
    _check_on_mesh(args, mesh, "args")
    _check_on_mesh(kwargs, mesh, "kwargs")
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return jax.jit(fn, static_argnums=static_argnums).lower(*args, **kwargs)


def compile_sharded(fn, *args, mesh: jax.sharding.Mesh, static_argnums=(), **kwargs):
    """AOT-compile `fn` for the TPU slice of `mesh` through libtpu (`lower_sharded`, then
    `.compile()`); returns the `jax.stages.Compiled`. Its `as_text()` is one device's SPMD
    program and its `memory_analysis()` one device's figures (`bench.collectives`)."""
    return lower_sharded(fn, *args, mesh=mesh, static_argnums=static_argnums, **kwargs).compile()
