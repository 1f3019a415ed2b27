"""Runs one case under pytest-benchmark: build, warm up (compile) and check outside the timed
region, time `jax.block_until_ready(f(*args))`, then record the case's figures in
`benchmark.extra_info` (written by `--benchmark-json` and `--benchmark-autosave`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bench.micro.cases import FIGURES_CPU, FIGURES_TPU, Case


def roofline(nbytes: int, nflops: int | None, seconds: float, chip: str) -> dict:
    """Achieved GB/s and percent of the chip's HBM roofline for `nbytes` in `seconds`; with
    `nflops`, achieved TFLOP/s and percent of the bf16 MXU peak."""
    from pallas_ops.chips import CHIPS

    spec = CHIPS[chip]
    out = {"gb_per_s": nbytes / seconds / 1e9,
           "hbm_roofline_pct": 100 * nbytes / seconds / spec.hbm_bytes_per_s}
    if nflops:
        out["tflop_per_s"] = nflops / seconds / 1e12
        out["mxu_peak_pct"] = 100 * nflops / seconds / spec.bf16_flops
    return out


def bound(nbytes: int, nflops: int | None, chip: str) -> tuple[str, float]:
    """("hbm" | "mxu", roofline floor in seconds): which peak binds at this arithmetic intensity."""
    from pallas_ops.chips import CHIPS

    spec = CHIPS[chip]
    t_hbm = nbytes / spec.hbm_bytes_per_s
    t_mxu = (nflops or 0) / spec.bf16_flops
    return ("mxu", t_mxu) if t_mxu > t_hbm else ("hbm", t_hbm)


def tpu_figures(nbytes: int, nflops: int | None, mean_s: float, min_s: float, chip: str) -> dict:
    """The extra_info figures of a TPU case, from the benchmark's mean and min round time."""
    which, floor = bound(nbytes, nflops, chip)
    out = {"bound": which, "roofline_floor_us": floor * 1e6}
    for tag, t in (("mean", mean_s), ("min", min_s)):
        out.update({f"{k}_at_{tag}": v for k, v in roofline(nbytes, nflops, t, chip).items()})
    return out


def _shape_params(shape) -> dict:
    return {k: v for k, v in dataclasses.asdict(shape).items() if k != "name"}


def run(benchmark, case: Case, *, tpu: bool, chip: str | None) -> None:
    import jax

    k = case.kernel
    fn, args = case.function(chip)
    if k.donate:
        # In-place kernels: donate the caches and feed each call's output to the next (the same
        # rows are rewritten every call, so the state stays the first call's result).
        f = jax.jit(fn, donate_argnums=k.donate)
        state = list(args)

        def call():
            out = f(*state)
            for i, o in zip(k.donate, out):
                state[i] = o
            return jax.block_until_ready(out)
    else:
        f = jax.jit(fn)

        def call():
            return jax.block_until_ready(f(*args))

    host = tuple(np.asarray(a) for a in args) if case.tiny else None   # before any donation
    out = call()                         # warm-up: compile and first run, not timed
    case.check(host, state if k.donate else args, out)
    del out

    nbytes = k.hbm_bytes(case.shape)
    nflops = k.flops(case.shape) if k.flops else None
    benchmark.group = case.group
    benchmark.extra_info.update({
        "kernel": k.name,
        "impl": case.impl,
        "shape": case.shape.name,
        "shape_params": _shape_params(case.shape),
        "figures": FIGURES_TPU if tpu else FIGURES_CPU,
        "chip": chip,
        "device_kind": jax.devices()[0].device_kind,
        "bytes": nbytes,
        "flops": nflops,
        "checked_against": case.checked_against,
    })
    benchmark(call)
    stats = getattr(benchmark.stats, "stats", None)   # None under --benchmark-disable
    if tpu and chip is not None and stats is not None:
        benchmark.extra_info.update(tpu_figures(nbytes, nflops, stats.mean, stats.min, chip))
