"""The wall-clock benchmark loop shared by every kernel's bench module.

`run(argv, module=..., inputs=...)` parses `--shape NAME` (repeatable; default all of the module's
catalogue shapes) and `--iters N`. On a TPU it times the jitted `module.build(shape, chip=...)`
function over `inputs(shape, specs)` and prints time, achieved GB/s (`module.hbm_bytes(shape)` /
time) and percent of the chip's HBM roofline. Off TPU it prints the bytes that must move and the
v5p HBM floor, marked "not measured".
"""
from __future__ import annotations

import argparse
import time


def run(argv, *, module, inputs, default_iters: int = 20) -> int:
    """module: a bench kernel module (KERNEL, shapes, find, build, hbm_bytes);
    inputs(shape, specs) -> concrete arrays for the built function."""
    import jax

    from pallas_ops.chips import CHIPS, current_chip

    p = argparse.ArgumentParser(prog=f"python -m bench.{module.KERNEL}")
    p.add_argument("--shape", action="append", help="catalogue shape name (default: all)")
    p.add_argument("--iters", type=int, default=default_iters)
    a = p.parse_args(argv)
    chosen = [module.find(n) for n in a.shape] if a.shape else module.shapes()
    width = max(len(s.name) for s in chosen) + 2
    chip = current_chip()
    if chip is None:
        v5p = CHIPS["v5p"].hbm_bytes_per_s
        print(f"no TPU: not measured. Bytes that must move and the v5p HBM floor "
              f"({v5p / 1e9:.0f} GB/s); see `python -m bench static --kernel {module.KERNEL}` "
              "for the static schedule estimate.")
        print(f"{'shape':{width}s} {'MB':>9s} {'v5p floor us':>13s}")
        for shape in chosen:
            nbytes = module.hbm_bytes(shape)
            print(f"{shape.name:{width}s} {nbytes / 1e6:9.2f} {nbytes / v5p * 1e6:13.2f}"
                  "  not measured")
        return 0

    peak = CHIPS[chip].hbm_bytes_per_s
    print(f"{chip}: HBM roofline {peak / 1e9:.0f} GB/s")
    print(f"{'shape':{width}s} {'us':>9s} {'GB/s':>8s} {'% HBM roofline':>15s}")
    for shape in chosen:
        fn, specs = module.build(shape, chip=chip)
        args = inputs(shape, specs)
        f = jax.jit(fn)
        jax.block_until_ready(f(*args))
        t0 = time.perf_counter()
        for _ in range(a.iters):
            out = f(*args)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / a.iters
        rate = module.hbm_bytes(shape) / dt
        print(f"{shape.name:{width}s} {dt * 1e6:9.1f} {rate / 1e9:8.0f} {100 * rate / peak:14.1f}%")
    return 0
