"""Static schedule analysis: what a kernel costs per main-loop iteration on a TPU, without a TPU.

libtpu's AOT compiler, run on this CPU for a TPU generation (`pallas_ops.aot`), can dump the final
VLIW schedule of every kernel (`LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, read by libtpu when it
starts: so the compile runs in a subprocess). `bench.static.parse` reads it; this module turns
the kernel's main loop into a bound:

    bundles/iteration   one bundle issues per cycle when nothing stalls (delay slots included)
    HBM cycles/iteration = bytes the iteration moves / (per-TensorCore HBM bandwidth / clock)
    bound               the larger of the two ("issue" or "HBM"); the ratio says by how much
    predicted time      (iterations / cores) x bound cycles, plus the bundles outside the main
                        loop (per enclosing-loop iteration when known, and once), / clock

bundles/iteration is the main loop's static span (every bundle once) unless the bench module
declares the hot path (`MainLoop.taken_branches`, `MainLoop.inner_trips`); the table then shows
the static span beside it.

It ignores stalls (DMA waits that outlast the issue time, MXU result latency beyond the schedule,
bank conflicts) and contention between TensorCores for HBM: it is a LOWER bound, to be checked
against wall-clock numbers when a TPU is available.

The kernels' bench modules provide the facts the dump cannot (CONTRIBUTING.md, bench bullet):
`build(shape, *, chip) -> (fn, args)` and `main_loop(shape, *, chip) -> MainLoop`.

Library:

    results = analyze_many([("peer_jax_paged_attention", "decode-b8-ctx4096-p16", "v5p")])
    r = analyze("peer_jax_paged_attention", "decode-b8-ctx4096-p16", chip="v5p")
    r.bundles_per_iteration, r.hbm_cycles_per_iteration, r.bound, r.predicted_us, r.vmem_bytes

CLI: `python -m bench static [--chip v5p] [--kernel NAME] [--shape NAME] [--all] [--json PATH]`.
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil
import tempfile

from bench.kernels import find_shape, load_module
from bench.static import parse as static_parse
from bench.static.dump import compile_and_dump


@dataclasses.dataclass(frozen=True)
class MainLoop:
    """What a bench module tells the static analysis about its kernel at one shape and chip.

    call_name: the `name=` of the kernel's `pl.pallas_call` (the HLO custom call is named after
        it: `NAME.1`); picks the kernel when the compiled function has several custom calls.
    bytes_per_iteration: HBM bytes one iteration of the main loop moves (DMA'd in plus written
        back), e.g. the K and V of one KV block of one kv head, or one vocab tile of logits.
    iterations: main-loop iterations of the whole call, summed over grid steps and TensorCores.
    cores: TensorCores the iterations are spread over (2 when a "parallel" grid axis is split
        over v5p's megacore, else 1).
    outer_iterations: iterations of the loop enclosing the main loop (usually: grid steps of the
        whole call), to charge that loop's own bundles; None: charge them once.
    loop_depth: override the main-loop rule (`static_parse.Schedule.main_loop`): take the loop
        with most bundles at this depth (1 = outermost, usually the grid loop).
    """
    call_name: str
    bytes_per_iteration: int
    iterations: int
    cores: int = 1
    outer_iterations: int | None = None
    loop_depth: int | None = None
    inner_trips: tuple[int, ...] | None = None
    taken_branches: tuple[bool, ...] | None = None

    # The static span of the main loop counts every bundle once: both sides of a `pl.when` that
    # the compiler kept as a branch, and each nested loop's body once. Two optional fields
    # describe the hot path instead (both in the order `--loops` prints):
    # inner_trips: for each loop nested in the main loop (at any depth, in schedule order), its
    #     iterations per iteration of the loop directly enclosing it (e.g. a fori_loop over the
    #     pages of a block; 0 if the hot path skips it). A loop the compiler duplicated (one copy
    #     per side of a branch) appears once per copy.
    # taken_branches: for each forward branch inside the main loop, whether the hot path takes
    #     it (jumping over the code it guards, e.g. a tail-block fix-up).


@dataclasses.dataclass
class Result:
    kernel: str
    shape: str
    chip: str
    status: str = "ok"                  # "ok", "skipped", "error"
    libtpu: str = ""                    # version of the libtpu that wrote the dump
    reason: str = ""
    call: str = ""                      # HLO custom-call instruction analysed
    total_bundles: int | None = None
    vmem_bytes: int | None = None       # sum of the call's VMEM allocations
    loops: list = dataclasses.field(default_factory=list)
    main_loop_region: int | None = None
    main_loop_depth: int | None = None
    bundles_per_iteration: int | None = None
    region_bundles_per_iteration: int | None = None   # LB .. `End region R` (hand-count style)
    main_loop_ops: dict = dataclasses.field(default_factory=dict)
    main_loop_static_bundles: int | None = None     # the main loop's span, nested bodies once
    main_loop_inner_loops: list = dataclasses.field(default_factory=list)  # [region, bundles]
    main_loop_forward_branches: list = dataclasses.field(default_factory=list)  # [idx, region, skip]
    main_loop_slots: dict = dataclasses.field(default_factory=dict)  # unit -> slots per iteration
    busiest_unit: str | None = None     # the unit that alone needs the most bundles per iteration
    busiest_unit_bundles: int | None = None
    hbm_bytes_per_iteration: int | None = None
    hbm_cycles_per_iteration: float | None = None
    iterations: int | None = None
    cores: int | None = None
    bound: str | None = None            # "issue" or "HBM"
    bound_cycles_per_iteration: float | None = None
    issue_over_hbm: float | None = None     # bundles / HBM cycles per iteration
    predicted_cycles: float | None = None
    predicted_us: float | None = None
    hbm_bytes_call: int | None = None   # bench module's hbm_bytes(shape)
    hbm_floor_us: float | None = None   # hbm_bytes_call at the whole chip's bandwidth
    flops_call: int | None = None       # bench module's flops(shape): compulsory matmul flops
    mxu_floor_us: float | None = None   # flops_call at the whole chip's bf16 MXU peak
    limit_us: float | None = None       # the physical limit: max(hbm_floor_us, mxu_floor_us)
    limit_kind: str | None = None       # which of the two it is: "HBM" or "MXU"
    efficiency: float | None = None     # limit_us / predicted_us
    peer: bool = False                  # another project's kernel (bench/kernels/peer_*.py)
    calls: list = dataclasses.field(default_factory=list)   # per kernel of a multi-call program
    xla_cost: dict = dataclasses.field(default_factory=dict)   # XLA's cost analysis of it all
    fusions: int | None = None          # XLA fusions in the compiled program
    delay_slot_violations: int = 0
    dump_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pick_call(calls: list[dict], call_name: str | None,
               taken: tuple = ()) -> tuple[dict | None, str]:
    """(the custom call to analyse, a note if it was not found by name); calls in `taken`
    (names) are passed over, so the k-th of several calls of one name can be picked."""
    calls = [c for c in calls if c.get("files", {}).get("bundles") and c["name"] not in taken]
    if not calls:
        return None, ""
    if call_name:
        for c in calls:
            n, op = c["name"], c["op_name"]
            if (n == call_name or n.startswith(call_name + ".") or f"/{call_name}/" in op
                    or op.endswith("/" + call_name)):
                return c, ""
    # No name match: the only kernel, or the one with most bundles.
    best = max(calls, key=lambda c: len(pathlib.Path(c["files"]["bundles"]).read_text()))
    note = "" if not call_name else (
        f"no custom call named {call_name!r} (found {[c['name'] for c in calls]}): "
        f"analysed {best['name']}")
    return best, note


def analyze_dump(bundles_text: str, *, chip: str, main_loop: MainLoop | None = None,
                 allocations_text: str | None = None, utilization_text: str | None = None,
                 result: Result | None = None, libtpu: str | None = None) -> Result:
    """The static estimate from one kernel's `final_bundles` text (+ its allocation table),
    written by libtpu version `libtpu` (default: the installed one)."""
    from pallas_ops.chips import CHIPS

    spec = CHIPS[chip]
    r = result or Result(kernel="", shape="", chip=chip)
    fmt = static_parse.dump_format(libtpu)
    r.libtpu = libtpu or static_parse.libtpu_version() or ""
    sched = static_parse.parse_schedule(bundles_text, fmt)
    r.total_bundles = sched.total_bundles
    r.delay_slot_violations = len(sched.delay_slot_violations())
    r.loops = [{k: v for k, v in lp.to_dict().items()
                if k in ("region", "depth", "start", "end", "bundles", "region_bundles",
                         "dma_issues", "parent")} for lp in sched.loops]
    if allocations_text is not None:
        r.vmem_bytes = static_parse.vmem_bytes(static_parse.parse_allocations(allocations_text))
    lp = sched.main_loop(main_loop.loop_depth if main_loop else None)
    if lp is None:
        r.reason = "no loop in the schedule"
        r.predicted_cycles = float(sched.total_bundles)
        r.predicted_us = r.predicted_cycles / spec.clock_hz * 1e6
        return r
    r.main_loop_region, r.main_loop_depth = lp.region, lp.depth
    r.main_loop_static_bundles = lp.bundles
    r.bundles_per_iteration = lp.bundles
    r.region_bundles_per_iteration = lp.region_bundles
    inner = sched.descendants(lp)
    r.main_loop_inner_loops = [[x.region, x.bundles] for x in inner]
    r.main_loop_forward_branches = [list(x) for x in sched.forward_branches(lp)]
    notes = []
    trips = main_loop.inner_trips if main_loop else None
    if trips is not None and len(trips) != len(inner):
        notes.append(f"inner_trips has {len(trips)} entries but the main loop holds "
                     f"{len(inner)} loops: ignored")
        trips = None
    if inner and trips is None:
        notes.append(f"main loop holds {len(inner)} inner loop(s) counted once per iteration "
                     "(give MainLoop.inner_trips)")
    taken = main_loop.taken_branches if main_loop else None
    if taken is not None and len(taken) != len(r.main_loop_forward_branches):
        notes.append(f"taken_branches has {len(taken)} entries but the main loop has "
                     f"{len(r.main_loop_forward_branches)} forward branches: ignored")
        taken = None
    r.bundles_per_iteration = sched.iteration_bundles(
        lp, taken=taken or (),
        trips=None if trips is None else {x.region: t for x, t in zip(inner, trips)})
    r.main_loop_ops = lp.op_counts
    if utilization_text is not None:
        util = static_parse.parse_utilization(utilization_text)
        if len(util.rows) == sched.total_bundles:
            r.main_loop_slots = util.totals(lp.start, lp.end)
            r.busiest_unit, _, r.busiest_unit_bundles = util.busiest(lp.start, lp.end)
    if notes:
        r.reason = "; ".join(notes)
    if main_loop is None:
        r.reason = "; ".join(notes + ["no main_loop(shape, *, chip) in the bench module: HBM "
                                      "side not known"])
        return r
    r.hbm_bytes_per_iteration = main_loop.bytes_per_iteration
    r.hbm_cycles_per_iteration = main_loop.bytes_per_iteration / spec.hbm_bytes_per_cycle_per_core
    r.iterations, r.cores = main_loop.iterations, main_loop.cores
    issue, hbm = float(r.bundles_per_iteration), r.hbm_cycles_per_iteration
    r.bound = "issue" if issue >= hbm else "HBM"
    r.bound_cycles_per_iteration = max(issue, hbm)
    r.issue_over_hbm = issue / hbm if hbm else None
    cycles = -(-main_loop.iterations // main_loop.cores) * r.bound_cycles_per_iteration
    # Bundles outside the main loop: the enclosing loop's own body per its iteration (if known),
    # everything outside the outermost enclosing loop once.
    parent = sched.loop(lp.parent) if lp.parent is not None else None
    if parent is not None:
        own = parent.bundles - lp.bundles   # the parent's static span holds the main loop once
        if main_loop.outer_iterations is not None:
            cycles += -(-main_loop.outer_iterations // main_loop.cores) * own
        else:
            cycles += own
        top = parent
        while top.parent is not None:
            top = sched.loop(top.parent)
        cycles += sched.total_bundles - top.bundles
    else:
        cycles += sched.total_bundles - lp.bundles
    r.predicted_cycles = cycles
    r.predicted_us = cycles / spec.clock_hz * 1e6
    return r


def _main_loop_of(mod, shape, chip) -> MainLoop | None:
    if mod is None or not hasattr(mod, "main_loop"):
        return None
    return mod.main_loop(shape, chip=chip)


def analyze_many(requests: list[tuple[str, str, str]], *, keep_dumps: str | None = None,
                 log=None) -> list[Result]:
    """Static analysis of (kernel, shape name, chip) triples, compiled in one subprocess."""
    from pallas_ops.chips import CHIPS

    results: list[Result] = []
    jobs, job_of = [], {}
    mods: dict[str, tuple] = {}
    for kernel, shape_name, chip in requests:
        r = Result(kernel=kernel, shape=shape_name, chip=chip)
        results.append(r)
        if kernel not in mods:
            mods[kernel] = load_module(kernel)
        mod, reason = mods[kernel]
        if mod is None:
            r.status, r.reason = "skipped", reason
            continue
        if chip not in CHIPS:
            r.status, r.reason = "error", f"unknown chip {chip!r}"
            continue
        try:
            find_shape(kernel, shape_name, mod)
        except KeyError as e:
            r.status, r.reason = "error", str(e)
            continue
        jid = len(jobs)
        jobs.append({"id": jid, "factory": "bench.static.dump:build_catalogue",
                     "kwargs": {"kernel": kernel, "shape": shape_name}, "chip": chip})
        job_of[jid] = r
    if not jobs:
        return results
    tmp = None
    out_dir = keep_dumps
    if out_dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_static_")
        out_dir = tmp
    try:
        records = compile_and_dump(jobs, out_dir, log=log)
        for jid, r in job_of.items():
            rec = records.get(jid, {"error": "no record"})
            if rec.get("error"):
                r.status, r.reason = "error", rec["error"].splitlines()[0][:300]
                continue
            mod = mods[r.kernel][0]
            shape = find_shape(r.kernel, r.shape, mod)
            r.peer = r.kernel.startswith("peer_")
            r.xla_cost, r.fusions = rec.get("cost") or {}, rec.get("fusions")
            if getattr(mod, "WHOLE_PROGRAM", False):
                _whole_program(r)
            elif not _analyze_calls(r, rec, mod, shape, keep=bool(keep_dumps)):
                continue
            _limits(r, mod, shape)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def _analyze_calls(r: Result, rec: dict, mod, shape, *, keep: bool = False) -> bool:
    """Analyse the program's kernel(s) into `r`; False (r.status "error") if none is found.

    A bench module's `main_loop` returns one MainLoop, or a tuple of them for a program of
    several pallas_calls (e.g. a peer's two calls per draft layer): the k-th is matched to the
    k-th custom call of its name, and the predicted times add up (`r.calls` lists each; the
    row's loop figures are the first call's)."""
    try:
        mls = _main_loop_of(mod, shape, r.chip)
    except Exception as e:  # noqa: BLE001
        mls, r.reason = None, f"main_loop() failed: {type(e).__name__}: {e}"
    multi = isinstance(mls, (tuple, list))
    mls = list(mls) if multi else [mls]
    taken, total_us, parts = [], 0.0, []
    for k, ml in enumerate(mls):
        call, note = _pick_call(rec["calls"], ml.call_name if ml else None, tuple(taken))
        if call is None:
            r.status, r.reason = "error", ("no tpu_custom_call with a final_bundles dump"
                                           + (f" for call {k} of {len(mls)}" if multi else ""))
            return False
        taken.append(call["name"])
        files = call["files"]
        text = {key: pathlib.Path(files[key]).read_text() if key in files else None
                for key in ("bundles", "allocations", "utilization")}
        part = r if k == 0 else Result(kernel=r.kernel, shape=r.shape, chip=r.chip)
        if k == 0:
            r.call = call["name"]
            r.reason = "; ".join(x for x in (r.reason, note) if x)
        reason, part.reason = part.reason, ""
        analyze_dump(text["bundles"], chip=r.chip, main_loop=ml,
                     allocations_text=text["allocations"],
                     utilization_text=text["utilization"], result=part)
        part.reason = "; ".join(x for x in (reason, part.reason, "" if k == 0 else note) if x)
        if part.bound is None:
            r.status, r.reason = "error", f"call {call['name']}: {part.reason or 'no bound'}"
            return False
        total_us += part.predicted_us
        parts.append(part)
        if keep and r.dump_dir is None:
            r.dump_dir = str(pathlib.Path(files["bundles"]).parent)
    if multi:
        r.calls = [{"call": name, "bundles_per_iteration": p.bundles_per_iteration,
                    "hbm_cycles_per_iteration": p.hbm_cycles_per_iteration, "bound": p.bound,
                    "issue_over_hbm": p.issue_over_hbm, "predicted_us": p.predicted_us,
                    "vmem_bytes": p.vmem_bytes}
                   for name, p in zip(taken, parts)]
        for name, p in zip(taken[1:], parts[1:]):
            if p.reason:
                r.reason = "; ".join(x for x in (r.reason, f"call {name}: {p.reason}") if x)
        r.predicted_us = total_us
        r.predicted_cycles = sum(p.predicted_cycles for p in parts)
    return True


def _whole_program(r: Result) -> None:
    """A peer that is a whole XLA program (no pallas_call): its time from XLA's own TPU cost
    model (`optimal_seconds`) and its bytes accessed at full bandwidth, the larger of the two.
    Both are what XLA believes the program needs, not a schedule read: a lower bound."""
    from pallas_ops.chips import CHIPS

    cost = r.xla_cost
    if not cost:
        r.status, r.reason = "error", "no cost analysis for the compiled program"
        return
    hbm_us = cost.get("bytes accessed", 0.0) / CHIPS[r.chip].hbm_bytes_per_s * 1e6
    model_us = cost.get("optimal_seconds", 0.0) * 1e6
    r.bound = "XLA"
    r.predicted_us = max(hbm_us, model_us)
    r.reason = "; ".join(x for x in (r.reason, (
        f"whole XLA program ({r.fusions} fusions): XLA's cost model {model_us:.1f} us, its "
        f"{cost.get('bytes accessed', 0.0) / 1e6:.1f} MB accessed at full bandwidth "
        f"{hbm_us:.1f} us")) if x)


def _limits(r: Result, mod, shape) -> None:
    """The shape's physical limit (compulsory HBM bytes and MXU flops) and r's efficiency."""
    from pallas_ops.chips import CHIPS

    spec = CHIPS[r.chip]
    if hasattr(mod, "hbm_bytes"):
        r.hbm_bytes_call = int(mod.hbm_bytes(shape))
        r.hbm_floor_us = r.hbm_bytes_call / spec.hbm_bytes_per_s * 1e6
    if hasattr(mod, "flops"):
        r.flops_call = int(mod.flops(shape))
        r.mxu_floor_us = r.flops_call / spec.bf16_flops * 1e6
    floors = [(v, k) for v, k in ((r.hbm_floor_us, "HBM"), (r.mxu_floor_us, "MXU"))
              if v is not None]
    if floors:
        r.limit_us, r.limit_kind = max(floors)
        if r.predicted_us and r.bound is not None:
            r.efficiency = r.limit_us / r.predicted_us


def analyze(kernel: str, shape: str, *, chip: str = "v5p", keep_dumps: str | None = None) -> Result:
    """Static analysis of one kernel at one catalogue shape for one TPU generation."""
    return analyze_many([(kernel, shape, chip)], keep_dumps=keep_dumps)[0]
