"""`python -m bench static`: the table of static schedule figures, from the command line."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from bench.kernels import KERNELS, kernel_shapes, load_module
from bench.static import parse as static_parse
from bench.static.analysis import Result, analyze_many


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def markdown_table(results: list[Result]) -> str:
    head = ("| kernel | shape | chip | bundles/iter | HBM cycles/iter | bound | predicted us "
            "| HBM floor us | VMEM | busiest unit |")
    lines = [head, "|" + "---|" * 10]
    notes = []
    for r in results:
        if r.status != "ok":
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.status}: {r.reason}")
            continue
        bpi = "-" if r.bundles_per_iteration is None else str(r.bundles_per_iteration)
        if r.bundles_per_iteration != r.main_loop_static_bundles:  # a declared hot path
            bpi += f" (span {r.main_loop_static_bundles})"
        hbm = "-" if r.hbm_cycles_per_iteration is None else f"{r.hbm_cycles_per_iteration:.0f}"
        if r.bound is None:
            bound = "-"
        else:
            bound = f"{r.bound} ({r.issue_over_hbm:.2f}x)"
        pred = "-" if r.predicted_us is None or r.bound is None else f"{r.predicted_us:.1f}"
        floor = "-" if r.hbm_floor_us is None else f"{r.hbm_floor_us:.1f}"
        busy = "-" if r.busiest_unit is None else f"{r.busiest_unit} {r.busiest_unit_bundles}"
        lines.append(f"| {r.kernel} | {r.shape} | {r.chip} | {bpi} | {hbm} | {bound} | {pred} "
                     f"| {floor} | {_fmt_bytes(r.vmem_bytes)} | {busy} |")
        if r.reason:
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.reason}")
        if r.delay_slot_violations:
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.delay_slot_violations} branches "
                         "do not match the pinned delay-slot count: dump format changed?")
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def requests_for(kernels, shapes_, chips) -> list[tuple[str, str, str]]:
    out = []
    for kernel in kernels:
        mod, _ = load_module(kernel)
        names = shapes_ or [s.name for s in kernel_shapes(kernel, mod)] or ["-"]
        if shapes_ and mod is not None:
            known = {s.name for s in kernel_shapes(kernel, mod)}
            names = [n for n in shapes_ if n in known]
            if not names:
                continue
        for chip in chips:
            for n in names:
                out.append((kernel, n, chip))
    return out


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m bench static",
        description="Static v5e/v5p/v6e schedule analysis of the kernels (libtpu AOT dumps).")
    p.add_argument("--chip", action="append", help="v5e, v5p, v6e (repeatable; default v5p)")
    p.add_argument("--kernel", action="append", help=f"one of {', '.join(KERNELS)} (repeatable)")
    p.add_argument("--shape", action="append", help="catalogue shape name (repeatable; default: "
                   "all shapes of the kernel)")
    p.add_argument("--all", action="store_true", help="every kernel at every shape")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--keep-dumps", help="keep the final_bundles / allocation dumps in this dir")
    p.add_argument("--loops", action="store_true", help="also print every loop of each kernel")
    a = p.parse_args(argv)
    version = static_parse.libtpu_version()
    if not static_parse.is_supported(version):
        print(f"warning: libtpu {version} installed; the dump format was checked on libtpu "
              f"{', '.join(static_parse.FORMATS)} only (bench/static/parse.py FORMATS): parsed "
              f"with {static_parse.NEWEST}'s facts, check the counts", file=sys.stderr)
    if not a.all and not a.kernel:
        p.error("give --kernel NAME (repeatable) or --all")
    kernels = list(KERNELS) if a.all and not a.kernel else a.kernel
    for k in kernels:
        if k not in KERNELS and load_module(k)[0] is None:
            p.error(f"unknown kernel {k!r}; known: {', '.join(KERNELS)}")
    chips = a.chip or ["v5p"]
    reqs = requests_for(kernels, a.shape, chips)
    if not reqs:
        p.error("no (kernel, shape) matches")
    results = analyze_many(reqs, keep_dumps=a.keep_dumps,
                           log=lambda m: print(m, file=sys.stderr))
    # Kernels whose module is missing collapse to one line.
    shown, seen_skip = [], set()
    for r in results:
        if r.status == "skipped":
            if r.kernel in seen_skip:
                continue
            seen_skip.add(r.kernel)
            r = dataclasses.replace(r, shape="*")
        shown.append(r)
    print(f"libtpu {version}\n")
    print(markdown_table(shown))
    if a.loops:
        for r in results:
            if r.status == "ok":
                print(f"\n{r.kernel} {r.shape} {r.chip} ({r.call}): {r.total_bundles} bundles; "
                      f"main loop region {r.main_loop_region}; ops/iter {r.main_loop_ops}; "
                      f"unit slots/iter {r.main_loop_slots}")
                print(f"  main loop: {r.main_loop_static_bundles} bundles static span, "
                      f"{r.bundles_per_iteration} on the declared hot path; inner loops "
                      f"[region, bundles] {r.main_loop_inner_loops}; forward branches "
                      f"[bundle, region, bundles skipped if taken] "
                      f"{r.main_loop_forward_branches}")
                for lp in r.loops:
                    print(f"  loop region {lp['region']} depth {lp['depth']}: {lp['bundles']} "
                          f"bundles/iter (LB..End region: {lp['region_bundles']}), "
                          f"{lp['dma_issues']} DMA issues, parent {lp['parent']}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps([r.to_dict() for r in results], indent=1))
        print(f"\nwrote {a.json}")
    return 0 if all(r.status != "error" for r in results) else 1
