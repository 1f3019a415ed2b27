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


def _bound(r: Result) -> str:
    if r.bound is None:
        return "-"
    if r.bound == "XLA":
        return "XLA cost model"
    return f"{r.bound} ({r.issue_over_hbm:.2f}x)"


def _us(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _limit(r: Result) -> str:
    return "-" if r.limit_us is None else f"{_us(r.limit_us)} {r.limit_kind}"


def markdown_table(results: list[Result]) -> str:
    """One row per (kernel, shape, chip). limit = max(HBM floor, MXU floor): the compulsory
    bytes at the chip's bandwidth, the compulsory matmul flops at its bf16 peak; efficiency =
    limit / predicted."""
    head = ("| kernel | shape | chip | bundles/iter | HBM cycles/iter | bound | predicted us "
            "| HBM floor us | MXU floor us | limit us | efficiency | VMEM | busiest unit |")
    lines = [head, "|" + "---|" * 13]
    notes = []
    for r in results:
        if r.status != "ok":
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.status}: {r.reason}")
            continue
        bpi = "-" if r.bundles_per_iteration is None else str(r.bundles_per_iteration)
        if r.bundles_per_iteration != r.main_loop_static_bundles:  # a declared hot path
            bpi += f" (span {r.main_loop_static_bundles})"
        if len(r.calls) > 1:
            bpi = " + ".join(str(c["bundles_per_iteration"]) for c in r.calls)
        hbm = "-" if r.hbm_cycles_per_iteration is None else f"{r.hbm_cycles_per_iteration:.0f}"
        if len(r.calls) > 1:
            hbm = " + ".join(f"{c['hbm_cycles_per_iteration']:.0f}" for c in r.calls)
        pred = "-" if r.predicted_us is None or r.bound is None else _us(r.predicted_us)
        busy = "-" if r.busiest_unit is None else f"{r.busiest_unit} {r.busiest_unit_bundles}"
        lines.append(f"| {r.kernel} | {r.shape} | {r.chip} | {bpi} | {hbm} | {_bound(r)} | {pred} "
                     f"| {_us(r.hbm_floor_us)} | {_us(r.mxu_floor_us)} | {_limit(r)} "
                     f"| {_pct(r.efficiency)} | {_fmt_bytes(r.vmem_bytes)} | {busy} |")
        if len(r.calls) > 1:
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {len(r.calls)} kernel calls, "
                         + " + ".join(f"{c['call']} {_us(c['predicted_us'])} us ({c['bound']})"
                                      for c in r.calls))
        if r.reason:
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.reason}")
        if r.delay_slot_violations:
            notes.append(f"- {r.kernel} {r.shape} {r.chip}: {r.delay_slot_violations} branches "
                         "do not match the pinned delay-slot count: dump format changed?")
    text = "\n".join(lines)
    if notes:
        text += "\n\n" + "\n".join(notes)
    return text


def side_by_side(results: list[Result]) -> str:
    """Ours and the peers at every (shape, chip) where a peer was asked for: one table per set
    of our kernels, a column per kernel (ours first). Each cell: predicted us (efficiency), the
    fastest in bold; "n/a" where the kernel does not run at that shape (an error: see the notes
    under the main table), "-" where it was not asked."""
    asked: dict[tuple, dict] = {}
    for r in results:
        if r.status != "skipped":
            asked.setdefault((r.shape, r.chip), {})[r.kernel] = r
    ok = lambda r: r.status == "ok" and r.predicted_us is not None   # noqa: E731
    groups: dict[tuple, list] = {}
    for key, rs in asked.items():
        mine = tuple(sorted(k for k, r in rs.items() if not r.peer and ok(r)))
        if mine and any(r.peer for r in rs.values()):
            groups.setdefault(mine, []).append(key)
    out = []
    for mine, keys in groups.items():
        peers = sorted({k for key in keys for k, r in asked[key].items() if r.peer})
        kernels = mine + tuple(peers)
        head = "| shape | chip | limit us | " + " | ".join(kernels) + " | fastest | ours / fastest peer |"
        lines = [head, "|" + "---|" * (len(kernels) + 5)]
        for key in keys:
            rs = {k: r for k, r in asked[key].items() if ok(r)}
            best = min(rs.values(), key=lambda r: r.predicted_us)
            ours = min((r for r in rs.values() if not r.peer), key=lambda r: r.predicted_us)
            theirs = [r for r in rs.values() if r.peer]
            limit = next((r.limit_us for r in rs.values() if r.limit_us is not None), None)
            cells = []
            for k in kernels:
                r = rs.get(k)
                if r is None:
                    cells.append("n/a" if k in asked[key] else "-")
                    continue
                eff = "" if r.efficiency is None else f" ({_pct(r.efficiency)})"
                cell = f"{_us(r.predicted_us)}{eff}"
                cells.append(f"**{cell}**" if r is best else cell)
            ratio = "-" if not theirs else (
                f"{ours.predicted_us / min(r.predicted_us for r in theirs):.2f}x")
            lines.append(f"| {key[0]} | {key[1]} | {_us(limit)} | " + " | ".join(cells)
                         + f" | {best.kernel} | {ratio} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def load_results(paths) -> list[Result]:
    """Results written by `--json` (one or more runs, in order): a (kernel, shape, chip) row of
    a later file replaces the same row of an earlier one."""
    fields = {f.name for f in dataclasses.fields(Result)}
    out: dict[tuple, Result] = {}
    for path in paths:
        for d in json.loads(pathlib.Path(path).read_text()):
            r = Result(**{k: v for k, v in d.items() if k in fields})
            out.pop((r.kernel, r.shape, r.chip), None)
            out[(r.kernel, r.shape, r.chip)] = r
    return list(out.values())


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
    p.add_argument("--from-json", nargs="+", metavar="JSON",
                   help="print the tables of earlier runs' --json files (merged) instead of "
                   "compiling")
    a = p.parse_args(argv)
    if a.from_json:
        results = load_results(a.from_json)
        libtpus = sorted({r.libtpu for r in results if r.libtpu})
        print(f"libtpu {', '.join(libtpus) or '?'} (from {', '.join(a.from_json)})\n")
        print(markdown_table(results))
        peers = side_by_side(results)
        if peers:
            print("\nSide by side (predicted us, efficiency = limit / predicted; bold: the "
                  "fastest):\n")
            print(peers)
        return 0
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
    peers = side_by_side(results)
    if peers:
        print("\nSide by side (predicted us, efficiency = limit / predicted; bold: the fastest):\n")
        print(peers)
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
