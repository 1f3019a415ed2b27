"""Per-TPU-generation constants, in one table, with their sources.

Used by the kernels' block-size tables and VMEM budgets, and by `bench/` for roofline figures.
`pltpu.get_tpu_info()` raises off TPU, so nothing here depends on it.

Sources: Google Cloud TPU system-architecture pages: HBM bandwidth per chip, bf16 peak and
TensorCores per chip. v5p: https://cloud.google.com/tpu/docs/v5p ("HBM bandwidth per chip
2765 GBps", listed as 2575 GiBps on newer revisions of the page: the same 2.765e12 B/s; HBM2e;
2 TensorCores per chip, so 1.3825e12 B/s per TensorCore); v5e: https://cloud.google.com/tpu/docs/v5e
(819 GBps); v6e: https://cloud.google.com/tpu/docs/v6e (1640 GBps). jax's own table
(`pltpu.get_tpu_info_for_chip`) gives v5p 2.46e12 B/s; this table keeps Google Cloud's figure.
VMEM capacity: `jax.experimental.pallas.tpu.get_tpu_info_for_chip` in jax 0.10.2. Clock: v5p
about 1.75 GHz, the figure ../shared/DESIGN.md uses for cycle budgets; v5e 1.5 GHz and v6e 1.75 GHz
derived from peak FLOP/s / MXU width and cross-checked against the same public pages. Treat clocks
as estimates: they only convert bundle counts into time.

Everything that needs a bandwidth (bench modules, `bench.static`, `bench.wall`) reads it from
`CHIPS`, not from a literal.
"""
from __future__ import annotations

import dataclasses

from pallas_ops.execution import on_tpu


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    name: str                 # "v5e", "v5p", "v6e"
    topology: str             # a topology name jax.experimental.topologies understands
    hbm_bytes_per_s: float    # per chip (all TensorCores together)
    tensorcores: int          # TensorCores per JAX device (megacore: 2 on v4/v5p)
    clock_hz: float
    bf16_flops: float         # per chip
    vmem_bytes: int           # per TensorCore

    @property
    def hbm_bytes_per_s_per_core(self) -> float:
        return self.hbm_bytes_per_s / self.tensorcores

    @property
    def hbm_bytes_per_cycle_per_core(self) -> float:
        return self.hbm_bytes_per_s_per_core / self.clock_hz


MiB = 1024 * 1024

CHIPS: dict[str, ChipSpec] = {
    "v5e": ChipSpec("v5e", "v5e:2x2", 819e9, 1, 1.5e9, 197e12, 128 * MiB),
    "v5p": ChipSpec("v5p", "v5p:2x2x1", 2.765e12, 2, 1.75e9, 459e12, 64 * MiB),
    "v6e": ChipSpec("v6e", "v6e:2x2", 1.64e12, 1, 1.75e9, 918e12, 128 * MiB),
}

_KIND_TO_CHIP = {
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}


def chip_from_device_kind(device_kind: str) -> str | None:
    """'TPU v5 lite' -> 'v5e' etc.; None for a kind this table does not know."""
    return _KIND_TO_CHIP.get(device_kind)


def current_chip(device=None) -> str | None:
    """The generation of `device` (default: the first JAX device), or None off TPU / unknown."""
    import jax

    if device is None:
        if not on_tpu():
            return None
        device = jax.devices()[0]
    if getattr(device, "platform", None) != "tpu":
        return None
    return chip_from_device_kind(device.device_kind)
