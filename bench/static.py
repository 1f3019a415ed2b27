"""Static schedule analysis: what a kernel costs per main-loop iteration on a TPU, without a TPU.

libtpu's AOT compiler, run on this CPU for a TPU generation (`pallas_ops.aot`), can dump the final
VLIW schedule of every kernel (`LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, read by libtpu when it
starts: so the compile runs in a subprocess). `bench.static_parse` reads it; this module turns
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
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

from bench import static_parse

# Kernels `--all` looks for, as bench modules `bench/<name>.py`; a missing one is skipped.
KERNELS = ("paged_attention", "block_attention", "verify_accept", "peer_jax_paged_attention")

_REPO = pathlib.Path(__file__).resolve().parent.parent
_JOB_TIMEOUT_S = 300


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
    delay_slot_violations: int = 0
    dump_dir: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Kernel discovery (parent side; no jax needed).

def load_module(kernel: str):
    """`bench.<kernel>`, or None with a reason if it is not there (yet) or lacks `build`."""
    try:
        mod = importlib.import_module(f"bench.{kernel}")
    except ModuleNotFoundError as e:
        if e.name in (f"bench.{kernel}",):
            return None, f"bench/{kernel}.py not present yet"
        return None, f"bench/{kernel}.py failed to import: {e}"
    except Exception as e:  # noqa: BLE001 - a half-written module must not stop the table
        return None, f"bench/{kernel}.py failed to import: {type(e).__name__}: {e}"
    if not hasattr(mod, "build"):
        return None, f"bench/{kernel}.py has no build(shape, *, chip)"
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


# --------------------------------------------------------------------------------------------
# The worker: runs in a subprocess whose libtpu dumps to a directory.

_CUSTOM_CALL_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*\bcustom-call\(.*"
                             r"custom_call_target=\"tpu_custom_call\"")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')


def _custom_calls(hlo_text: str) -> list[dict]:
    calls = []
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL_RE.match(line)
        if m:
            op = _OP_NAME_RE.search(line)
            calls.append({"name": m.group(1), "op_name": op.group(1) if op else ""})
    return calls


def _dump_files(dump_dir: pathlib.Path, new: set[str], instr: str) -> dict:
    pat = re.compile(r"^\d+-" + re.escape(instr) + r"-\d+-(.*)\.txt$")
    found = {}
    for f in sorted(new):
        m = pat.match(f)
        if not m:
            continue
        kind = m.group(1)
        if kind == "final_bundles":
            found["bundles"] = f
        elif kind == "schedule-analysis_final_bundles":
            found["schedule_analysis"] = f
        elif kind == "pre-finalize-registers-and-allocations":
            found["allocations"] = f
        elif kind == "final_hlo-static-per-bundle-utilization":
            found["utilization"] = f
    return found


def _build_catalogue(kernel: str, shape: str, chip: str):
    mod, reason = load_module(kernel)
    if mod is None:
        raise RuntimeError(reason)
    return mod.build(find_shape(kernel, shape, mod), chip=chip)


def _resolve(factory: str):
    mod, _, attr = factory.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _worker(jobs_path: str, dump_dir: str, out_dir: str, results_path: str) -> None:
    """Compile each job (`factory(**kwargs, chip=chip) -> (fn, args)`), keep its dump files."""
    from pallas_ops.aot import compile_for_tpu

    dump = pathlib.Path(dump_dir)
    out = pathlib.Path(out_dir)
    jobs = json.loads(pathlib.Path(jobs_path).read_text())
    for job in jobs:
        rec = {"id": job["id"], "calls": [], "error": None}
        try:
            before = set(os.listdir(dump)) if dump.exists() else set()
            fn, args = _resolve(job["factory"])(**job.get("kwargs", {}), chip=job["chip"])
            compiled = compile_for_tpu(fn, *args, chip=job["chip"])
            new = set(os.listdir(dump)) - before if dump.exists() else set()
            jdir = out / f"job{job['id']}"
            jdir.mkdir(parents=True, exist_ok=True)
            for call in _custom_calls(compiled.as_text()):
                files = _dump_files(dump, new, call["name"])
                for key, f in files.items():
                    shutil.copy(dump / f, jdir / f)
                    files[key] = str(jdir / f)
                rec["calls"].append({**call, "files": files})
            for f in new:  # keep the tmp dir small between jobs
                try:
                    os.remove(dump / f)
                except OSError:
                    pass
        except Exception as e:  # noqa: BLE001 - report, go on with the next job
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=8)
        with open(results_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def _worker_env(dump_dir: str) -> dict:
    env = dict(os.environ)
    flags = env.get("LIBTPU_INIT_ARGS", "")
    env["LIBTPU_INIT_ARGS"] = (flags + " " if flags else "") + f"--xla_jf_dump_to={dump_dir}"
    # Quiet libtpu's start-up on a host without a TPU (as tests/conftest.py does).
    if not any(pathlib.Path("/dev").glob("accel*")) and not pathlib.Path("/dev/vfio").exists():
        env.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
        env.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        env.setdefault("GLOG_minloglevel", "3")
    # Several processes on this host may load libtpu at once (other compiles, test runs): without
    # this, the second one fails on libtpu's /tmp/libtpu_lockfile. AOT compiles need no TPU.
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # A compile served from jax's persistent cache would write no dump.
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["PYTHONPATH"] = str(_REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def compile_and_dump(jobs: list[dict], out_dir: str, *, log=None) -> dict[int, dict]:
    """Compile `jobs` in subprocesses with libtpu dumping; returns {job id: record}.

    A job is {"id": int, "factory": "module:function", "kwargs": {...}, "chip": "v5p"}; the
    function returns (fn, args) as a bench module's `build` does. A record has "calls" (each
    HLO `tpu_custom_call`: name, op_name, files {bundles, schedule_analysis, allocations}) and
    "error". One subprocess runs them all in turn; if it dies, the job it died on is recorded as
    an error and a new subprocess takes the rest.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[int, dict] = {}
    pending = list(jobs)
    attempt = 0
    while pending:
        attempt += 1
        jobs_path = out / f"jobs{attempt}.json"
        results_path = out / f"results{attempt}.jsonl"
        jobs_path.write_text(json.dumps(pending))
        with tempfile.TemporaryDirectory(prefix="xla_jf_dump_") as dump_dir:
            cmd = [sys.executable, "-m", "bench.static", "_worker", str(jobs_path), dump_dir,
                   str(out), str(results_path)]
            try:
                proc = subprocess.run(cmd, env=_worker_env(dump_dir), cwd=str(_REPO),
                                      capture_output=True, text=True,
                                      timeout=_JOB_TIMEOUT_S * len(pending))
                failure = None if proc.returncode == 0 else (
                    f"compile subprocess exited with {proc.returncode}: "
                    + (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1])
            except subprocess.TimeoutExpired:
                failure = "compile subprocess timed out"
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                rec = json.loads(line)
                records[rec["id"]] = rec
        remaining = [j for j in pending if j["id"] not in records]
        if remaining and failure is None:
            failure = "compile subprocess ended without reporting"
        if remaining:
            records[remaining[0]["id"]] = {"id": remaining[0]["id"], "calls": [],
                                           "error": failure}
            if log:
                log(f"{remaining[0]}: {failure}")
        pending = remaining[1:]
    return records


# --------------------------------------------------------------------------------------------
# Analysis (parent side).

def _pick_call(calls: list[dict], call_name: str | None) -> tuple[dict | None, str]:
    """(the custom call to analyse, a note if it was not found by name)."""
    calls = [c for c in calls if c.get("files", {}).get("bundles")]
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
                 result: Result | None = None) -> Result:
    """The static estimate from one kernel's `final_bundles` text (+ its allocation table)."""
    from pallas_ops.chips import CHIPS

    spec = CHIPS[chip]
    r = result or Result(kernel="", shape="", chip=chip)
    sched = static_parse.parse_schedule(bundles_text)
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
        jobs.append({"id": jid, "factory": "bench.static:_build_catalogue",
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
            try:
                ml = _main_loop_of(mod, shape, r.chip)
            except Exception as e:  # noqa: BLE001
                ml, r.reason = None, f"main_loop() failed: {type(e).__name__}: {e}"
            call, note = _pick_call(rec["calls"], ml.call_name if ml else None)
            if call is None:
                r.status, r.reason = "error", "no tpu_custom_call with a final_bundles dump"
                continue
            r.call = call["name"]
            r.reason = "; ".join(x for x in (r.reason, note) if x)
            files = call["files"]
            text = {k: pathlib.Path(files[k]).read_text() if k in files else None
                    for k in ("bundles", "allocations", "utilization")}
            reason = r.reason
            analyze_dump(text["bundles"], chip=r.chip, main_loop=ml,
                         allocations_text=text["allocations"],
                         utilization_text=text["utilization"], result=r)
            r.reason = "; ".join(x for x in (reason, r.reason) if x)
            if hasattr(mod, "hbm_bytes"):
                r.hbm_bytes_call = int(mod.hbm_bytes(shape))
                r.hbm_floor_us = r.hbm_bytes_call / CHIPS[r.chip].hbm_bytes_per_s * 1e6
            if keep_dumps:
                r.dump_dir = str(pathlib.Path(files["bundles"]).parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def analyze(kernel: str, shape: str, *, chip: str = "v5p", keep_dumps: str | None = None) -> Result:
    """Static analysis of one kernel at one catalogue shape for one TPU generation."""
    return analyze_many([(kernel, shape, chip)], keep_dumps=keep_dumps)[0]


# --------------------------------------------------------------------------------------------
# Reporting.

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
    if version != static_parse.LIBTPU_VERSION_PINNED:
        print(f"warning: libtpu {version} installed; the dump format was pinned on "
              f"{static_parse.LIBTPU_VERSION_PINNED} (bench/static_parse.py): check the counts",
              file=sys.stderr)
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


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        _worker(*sys.argv[2:6])
    else:
        raise SystemExit(main())
