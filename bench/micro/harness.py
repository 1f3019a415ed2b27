"""Runs one case under pytest-benchmark: build, warm up (compile) and check outside the timed
region, time the call, then record the case's figures in `benchmark.extra_info` (written by
`--benchmark-json` and `--benchmark-autosave`).

Timing: `benchmark.pedantic(iterations=n)`, n = calls per round (`--micro-calls-per-round`,
default 16 on a TPU, 2 elsewhere). A round dispatches n calls back to back and waits for the
device once, after the n-th (`jax.block_until_ready` on all n outputs), so the host's dispatch
overlaps the device's work as in a serving loop; pytest-benchmark divides each round by n, so
every reported time is per call. n = 1 gives the blocking latency of one call instead. The
number of rounds follows pytest-benchmark's own options: max(--benchmark-min-rounds,
--benchmark-max-time / one round's time), plus warm-up rounds under --benchmark-warmup.
"""
from __future__ import annotations

import dataclasses
import math
import time

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


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's mode and timing options (bench/micro/conftest.py builds it from the command line)."""
    tpu: bool
    chip: str | None              # TPU generation (pallas_ops.chips), None off TPU / unknown
    calls_per_round: int
    min_rounds: int = 5           # --benchmark-min-rounds
    max_time: float = 1.0         # --benchmark-max-time, seconds
    warmup_calls: int = 0         # --benchmark-warmup-iterations when --benchmark-warmup is on


class Pipelined:
    """pedantic's target: each invocation dispatches one call; every n-th waits for the device on
    the outputs of the round's n calls (pedantic(iterations=n) times n invocations as one round).
    chained: each call consumes the previous call's (donated) outputs, so the round's last output
    stands for all of them (the earlier ones no longer exist)."""

    def __init__(self, dispatch, n: int, *, chained: bool = False):
        self.dispatch, self.n, self.chained = dispatch, n, chained
        self.calls, self.pending = 0, []

    def __call__(self):
        out = self.dispatch()
        self.calls += 1
        self.pending = [out] if self.chained else self.pending + [out]
        if self.calls % self.n == 0:
            self.wait()
        return out

    def wait(self) -> None:
        import jax

        jax.block_until_ready(self.pending)
        self.pending = []

    def round(self) -> float:
        """One untimed round (n calls, one wait); returns its wall time in seconds."""
        self.wait()
        self.calls = 0
        t0 = time.perf_counter()
        for _ in range(self.n):
            self()
        return time.perf_counter() - t0


def run(benchmark, case: Case, settings: Settings) -> None:
    import jax

    k, tpu, chip, n = case.kernel, settings.tpu, settings.chip, settings.calls_per_round
    fn, args = case.function(chip)
    if k.donate:
        # In-place kernels: donate the caches and feed each call's output to the next (the same
        # rows are rewritten every call, so the state stays the first call's result).
        f = jax.jit(fn, donate_argnums=k.donate)
        state = list(args)

        def dispatch():
            out = f(*state)
            for i, o in zip(k.donate, out):
                state[i] = o
            return out
    else:
        f = jax.jit(fn)

        def dispatch():
            return f(*args)

    host = tuple(np.asarray(a) for a in args) if case.tiny else None   # before any donation
    out = jax.block_until_ready(dispatch())   # warm-up: compile and first run, not timed
    case.check(host, state if k.donate else args, out)
    del out
    target = Pipelined(dispatch, n, chained=bool(k.donate))
    t_round = target.round()                  # untimed: sizes the number of rounds
    rounds = max(settings.min_rounds, math.ceil(settings.max_time / max(t_round, 1e-9)))
    warmup = min(rounds, max(1, settings.warmup_calls // n)) if settings.warmup_calls else 0

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
        "calls_per_round": n,
        "timing": f"per call; {n} calls dispatched back to back per round, one wait for the "
                  "device at the end of each round",
    })
    benchmark.pedantic(target, rounds=rounds, iterations=n, warmup_rounds=warmup)
    target.wait()                             # the call pedantic adds after its rounds
    stats = getattr(benchmark.stats, "stats", None)   # None under --benchmark-disable
    if tpu and chip is not None and stats is not None:
        benchmark.extra_info.update(tpu_figures(nbytes, nflops, stats.mean, stats.min, chip))
