"""Parser of libtpu's final VLIW schedule dumps (`*-final_bundles.txt`): pure Python, no jax.

With `LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, every compiled TPU op (a Pallas kernel is a
`tpu_custom_call` named after its HLO instruction, e.g. `paged_attention.1`) leaves in DIR:

    <id>-<instr>-<NN>-final_bundles.txt                        the final schedule (parsed here)
    <id>-<instr>-<NN>-schedule-analysis_final_bundles.txt      "total scheduled bundles: N"
    <id>-<instr>-<NN>-pre-finalize-registers-and-allocations.txt   the allocation table
    <id>-<instr>-<NN>-final_hlo-static-per-bundle-utilization.txt  slots used per unit per bundle

This is libtpu's internal format: it may change with its version. The facts below were checked on
the libtpu versions in `FORMATS` (0.0.42.1, which jax[tpu] 0.10.2 brings, and 0.0.50.1, which
jax[tpu] 0.12.0.1 brings), on the dumps of every kernel at every catalogue shape; where a fact
is per version it is a field of `DumpFormat`. `tests/test_bench_static.py` checks them on a
checked-in dump per version (tests/data/libtpu-<version>/) and on a fresh compile.

- A key between `= control target key start` and `= control target key end` lines, then one
  bundle per line: `<addr> <tag>: <depth> { op ;; op ;; ... } /* region events */`. `<addr>` is
  the bundle index (decimal `0` then hex `0x1`, `0x2`, ...), `<tag>` is blank or one of LH (loop
  header), LB (loop body start), LE (loop exit), PB/PF (predicated region body / fallthrough),
  CT (control target); `<depth>` is `>` repeated once per enclosing loop (blank outside loops, and
  blank on bundles inside a loop that hold only code of the surrounding region). Empty bundles
  are `{}` and take a cycle like any other.
- Some ops carry multi-line comments (DMA descriptors, bounds checks): the bundle continues on
  the following lines, which do not start with an address, until the next bundle line. Region
  events may be on such a continuation line.
- Region events: `Start region R`, `End region R`, `Start/End empty region R`, joined by ` :: `.
- Branches: `%n = sbr.rel (pred) target = $regionR` (the only branch op in either version). A
  branch takes effect after `DumpFormat.delay_slots` further bundles: 4 in both versions. Checked
  per branch: in the `*-post-delay-converter.txt` listing (one of libtpu's other dump files)
  each `sbr.rel` sits in its own region (`// pred_check_branch` or `// loop_header_branch`), and
  in the final bundles that region ends exactly 4 bundles after the branch: all 100 branches of
  the paged (decode-b8-ctx4096-p16, mixed), block (qwen3 b32 ctx8192), verify (qwen3 sampling)
  and jax paged (decode p16) kernels, and of the XLA fusions compiled with them (100 / 105),
  under each version. The slots hold useful or predicated-off work or `{}`.
- A loop is an `LB:` bundle that starts region R plus the back-branch (the first later
  `sbr.rel ... target = $regionR`). One iteration executes the bundles from the LB bundle through
  the back-branch's last delay slot: that is `Loop.bundles`. The marker `End region R` itself is
  NOT a reliable end, in either version: it can fall up to 17 bundles before the last delay slot
  (jax's paged_attention: 9 early with 0.0.42.1, on the last delay slot with 0.0.50.1;
  verify_accept's vocab loop: 9-17 early with 0.0.42.1, 9-13 with 0.0.50.1) or between the
  branch and its delay slots (the minimal loop of the tests, both versions);
  `Loop.region_bundles` (LB .. `End region R`) is kept for comparison with hand counts.
  `Loop.bundles` is the static span: code under a forward branch (a `pl.when` the compiler did
  not if-convert) counts even when the branch jumps over it, and a nested loop's body counts
  once; `Schedule.iteration_bundles` walks one path instead.
- DMA issue ops are `dma.hbm_to_vmem`, `dma.vmem_to_hbm`, `dma.hbm_to_smem`, ...; waits are
  `dma.done.wait`. Bounds checks are `shalt.err` ops guarded by scalar compares (they are in the
  final program and cost issue slots). A bounds check's comment names the DMA it guards
  (0.0.42.1: the whole op, `for %26 = dma.hbm_to_vmem [thread:$0] /*hbm=*/...`; 0.0.50.1: its
  name only, `for dma.hbm_to_vmem`): comments are stripped before ops are counted. Some vector
  mnemonics changed between the versions (0.0.50.1: `vexp2.f32` for `vpow2.f32`,
  `vpack.c.f32.bf16`, `vperm.lane.xlu0`, ...); the op classes (`op_class`) are the same.
- Per-bundle unit use (`*-final_hlo-static-per-bundle-utilization.txt`): `== CAPACTIY:` (sic),
  a line of unit names (`MXU, XLU, VALU, VPOP, EUP, VLOAD, VLOAD:FILL, VSTORE, VSTORE:SPILL, SALU`
  on v5p), a line of slots per bundle, `== UTILIZATION:`, then one line of slot counts per bundle,
  in bundle order (the same header, typo included, in both versions).
- Allocations: lines `#allocationN [shape = '...', space=vmem|smem|sflag|..., size = 0x..., ...]`;
  `size` already covers all buffering levels of a pipelined window. Allocation numbers differ
  between versions (0.0.50.1 numbers an extra scoped sflag first).
- The line format, the control-target key (tags LH, LB, LE, PB, PF, CT), the region events and
  the four file names (kinds after `<id>-<instr>-<NN>-`; NN shifted, not used) are the same in
  both versions.
"""
from __future__ import annotations

import collections
import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class DumpFormat:
    """The dump-format facts of one libtpu version that the parser and `bench.static.dump` use.

    libtpu: the version they were checked on; jax: the jax/jaxlib whose `jax[tpu]` brings it
    (the bench modules' hot paths depend on both: jax's bundled kernels change with jax).
    delay_slots: bundles a branch runs after itself before it takes effect.
    files: `bench.static.dump` key -> the dump file kind (`<id>-<instr>-<NN>-<kind>.txt`).
    """
    libtpu: str
    jax: str
    delay_slots: int
    files: tuple[tuple[str, str], ...] = (
        ("bundles", "final_bundles"),
        ("schedule_analysis", "schedule-analysis_final_bundles"),
        ("allocations", "pre-finalize-registers-and-allocations"),
        ("utilization", "final_hlo-static-per-bundle-utilization"),
    )


# One entry per libtpu version the facts were checked on (module docstring); `bench static`
# warns on any other version, and `tests/test_bench_static.py` fails on one.
FORMATS: dict[str, DumpFormat] = {
    "0.0.42.1": DumpFormat(libtpu="0.0.42.1", jax="0.10.2", delay_slots=4),
    "0.0.50.1": DumpFormat(libtpu="0.0.50.1", jax="0.12.0.1", delay_slots=4),
}
NEWEST = max(FORMATS, key=lambda v: tuple(int(x) for x in v.split(".")))


def libtpu_version() -> str | None:
    """The installed libtpu's version (None if it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_supported(version: str | None) -> bool:
    """Whether the dump-format facts were checked on this libtpu version."""
    return version in FORMATS


def dump_format(version: str | None = None) -> DumpFormat:
    """The facts for `version` (default: the installed libtpu's). A version not in `FORMATS`
    (or no libtpu) gets the newest entry: the CLI warns that its counts are unchecked."""
    v = libtpu_version() if version is None else version
    return FORMATS.get(v, FORMATS[NEWEST])

_BUNDLE_RE = re.compile(
    r"^\s*(0x[0-9a-fA-F]+|[0-9]+)\s+(?:(LH|LB|LE|PB|PF|CT):|:)\s*(>*)(.*)$")
_REGION_RE = re.compile(r"(Start/End empty|Start|End) region (\d+)")
_BRANCH_RE = re.compile(r"=\s*(s?br[\w.]*)\s*(?:\([^)]*\))?\s*target\s*=\s*\$region(\d+)")
_OP_RE = re.compile(r"^\s*(?:%[\w.]+\s*=\s*)?([A-Za-z_][\w.]*)")
_ALLOC_RE = re.compile(
    r"#allocation(\d+)(?:_\w+)?\s*\[shape\s*=\s*'([^']*)',\s*space=(\w+),\s*size\s*=\s*(0x[0-9a-fA-F]+|\d+)"
    r"(?:[^\]]*?tag\s*=\s*'([^']*)')?")
_TOTAL_RE = re.compile(r"total scheduled bundles:\s*(\d+)")


def strip_comments(text: str) -> str:
    """Remove `/* ... */` comments (which nest in these dumps)."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif depth and text.startswith("*/", i):
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def op_class(op: str) -> str:
    """Coarse unit of an op name: dma, dma_wait, bounds_check, branch, mxu, vector, scalar, sync,
    other."""
    if op.startswith("dma.done") or op in ("vwait", "dma.wait"):
        return "dma_wait"
    if op.startswith("dma."):
        return "dma"
    if op == "shalt.err":
        return "bounds_check"
    if op.startswith(("sbr", "br")):
        return "branch"
    if ".mxu" in op or op.startswith(("vmatmul", "vmatpush", "vmatres")):
        return "mxu"
    if op.startswith(("vsync", "ssync")):
        return "sync"
    if op.startswith("v"):
        return "vector"
    if op.startswith(("s", "p", "int_to_ptr", "scalar")):
        return "scalar"
    return "other"


@dataclasses.dataclass
class Bundle:
    index: int              # position in the schedule (equals the address)
    tag: str                # "", "LH", "LB", "LE", "PB", "PF", "CT"
    depth: int              # number of `>` markers
    text: str               # the whole bundle, continuation lines included
    ops: list[str]          # op names, comments stripped
    starts: list[int]       # regions started here (Start region R, Start/End empty region R)
    ends: list[int]         # regions ended here
    branch_target: int | None  # region a branch in this bundle targets

    @property
    def empty(self) -> bool:
        return not self.ops


@dataclasses.dataclass
class Loop:
    region: int             # R: the loop's region (its LB bundle starts it, its back-branch targets it)
    depth: int              # number of `>` on the LB bundle (1 = outermost loop)
    start: int              # index of the LB bundle
    branch: int             # index of the back-branch
    end: int                # index of the last bundle of one iteration (branch + delay slots)
    region_end: int | None  # index of the bundle saying `End region R`
    op_counts: dict[str, int]   # op class -> count over one iteration (nested loop bodies once)
    dma_issues: int         # DMA issue ops (hbm<->vmem/smem) in one iteration
    parent: int | None = None   # region of the innermost enclosing loop
    children: list[int] = dataclasses.field(default_factory=list)

    @property
    def bundles(self) -> int:
        """Bundles (cycles without stalls) of one iteration, delay slots included; an inner loop's
        body is counted once."""
        return self.end - self.start + 1

    @property
    def region_bundles(self) -> int | None:
        return None if self.region_end is None else self.region_end - self.start + 1

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bundles"] = self.bundles
        d["region_bundles"] = self.region_bundles
        return d


@dataclasses.dataclass
class Schedule:
    bundles: list[Bundle]
    loops: list[Loop]
    delay_slots: int = 4    # of the DumpFormat it was parsed with

    @property
    def total_bundles(self) -> int:
        return len(self.bundles)

    @property
    def empty_bundles(self) -> int:
        return sum(b.empty for b in self.bundles)

    def loop(self, region: int) -> Loop:
        for lp in self.loops:
            if lp.region == region:
                return lp
        raise KeyError(region)

    def delay_slot_violations(self) -> list[int]:
        """Branches with no region ending exactly `delay_slots` bundles later (indices).

        Every branch in the dumps checked ends the region holding it `delay_slots` bundles after
        it; a non-empty result means the format (or the delay) changed: re-check
        `DumpFormat.delay_slots` before trusting `Loop.bundles`.
        """
        bad = []
        for b in self.bundles:
            if b.branch_target is None:
                continue
            k = b.index + self.delay_slots
            if k >= len(self.bundles) or not self.bundles[k].ends:
                bad.append(b.index)
        return bad

    def main_loop(self, depth: int | None = None) -> Loop | None:
        """The kernel's main loop.

        Rule: among loops whose iteration (nested loops included) issues a DMA AND does vector
        or MXU work, the deepest (ties: most bundles per iteration). This is the KV-block / tile
        loop of a streaming kernel: with manual DMAs the loop that issues the next block's copies
        (a small inner loop that only issues per-page DMAs does no vector work, so it is not
        chosen); with BlockSpec pipelining, the grid loop, which issues the next grid step's
        window copies. Failing that, the deepest DMA-issuing loop; without any, the loop with the
        most bundles. `depth` overrides: the loop with most bundles at exactly that depth.
        """
        if not self.loops:
            return None
        if depth is not None:
            cands = [lp for lp in self.loops if lp.depth == depth]
            if not cands:
                raise ValueError(f"no loop at depth {depth}; depths: "
                                 f"{sorted({lp.depth for lp in self.loops})}")
            return max(cands, key=lambda lp: lp.bundles)
        def works(lp):
            return lp.op_counts.get("vector", 0) + lp.op_counts.get("mxu", 0) > 0

        cands = ([lp for lp in self.loops if lp.dma_issues and works(lp)]
                 or [lp for lp in self.loops if lp.dma_issues])
        if not cands:
            return max(self.loops, key=lambda lp: lp.bundles)
        return max(cands, key=lambda lp: (lp.depth, lp.bundles))

    def descendants(self, loop: Loop) -> list[Loop]:
        """Loops nested (at any depth) in `loop`, in schedule order."""
        return sorted((lp for lp in self.loops if lp is not loop
                       and loop.start <= lp.start and lp.end <= loop.end),
                      key=lambda lp: lp.start)

    def forward_branches(self, loop: Loop) -> list[tuple[int, int, int]]:
        """Forward branches inside one iteration of `loop`: (bundle index, target region,
        bundles jumped over when taken). Code under a taken branch is in the static count of
        `loop.bundles` but does not run."""
        start_of: dict[int, int] = {}
        for b in self.bundles:
            for r in b.starts:
                start_of.setdefault(r, b.index)
        out = []
        for b in self.bundles[loop.start:loop.end + 1]:
            t = start_of.get(b.branch_target) if b.branch_target is not None else None
            if t is not None and t > b.index:
                out.append((b.index, b.branch_target,
                            max(t - (b.index + self.delay_slots + 1), 0)))
        return out

    def iteration_bundles(self, loop: Loop, *, taken=(), trips: dict[int, int] | None = None
                          ) -> int:
        """Bundles of one iteration of `loop` along one path.

        taken: for each forward branch of `self.forward_branches(loop)`, in that order, whether
            it is taken on the path (a taken branch still runs its delay slots, then
            resumes at its target region); missing entries mean not taken.
        trips: nested loop region -> iterations it runs per iteration of its parent (default 1).
        With no branch taken and every nested loop run once this is `loop.bundles`.
        """
        fwd = self.forward_branches(loop)
        taken_at = {idx: region for (idx, region, _), t in zip(fwd, taken) if t}
        start_of: dict[int, int] = {}
        for b in self.bundles:
            for r in b.starts:
                start_of.setdefault(r, b.index)
        trips = trips or {}
        inner = {lp.start: lp for lp in self.descendants(loop)}

        def walk(lp: Loop) -> int:
            n, i = 0, lp.start
            while i <= lp.end:
                child = inner.get(i) if i != lp.start else None
                if child is not None:
                    n += trips.get(child.region, 1) * walk(child)
                    i = child.end + 1
                    continue
                n += 1
                if i in taken_at:
                    slots = min(self.delay_slots, lp.end - i)
                    n += slots
                    i = max(start_of[taken_at[i]], i + slots + 1)
                    continue
                i += 1
            return n

        return walk(loop)

    def summary(self) -> dict:
        return {
            "total_bundles": self.total_bundles,
            "empty_bundles": self.empty_bundles,
            "loops": [lp.to_dict() for lp in self.loops],
        }


def _parse_bundle(index: int, tag: str, depth: str, text: str) -> Bundle:
    code = strip_comments(text)
    ops = []
    lb, rb = code.find("{"), code.rfind("}")
    if lb >= 0 and rb > lb:
        for part in code[lb + 1:rb].split(";;"):
            m = _OP_RE.match(part)
            if m:
                ops.append(m.group(1))
    starts, ends = [], []
    for kind, r in _REGION_RE.findall(text):
        r = int(r)
        if kind == "Start":
            starts.append(r)
        elif kind == "End":
            ends.append(r)
        else:  # Start/End empty region: starts and ends here
            starts.append(r)
            ends.append(r)
    m = _BRANCH_RE.search(code)
    return Bundle(index=index, tag=tag or "", depth=len(depth), text=text, ops=ops,
                  starts=starts, ends=ends, branch_target=int(m.group(2)) if m else None)


def parse_bundles(text: str) -> list[Bundle]:
    """The bundles of a `*-final_bundles.txt` dump, in order (index == address)."""
    raw: list[list] = []
    in_key = False
    for line in text.splitlines():
        if line.startswith("= control target key start"):
            in_key = True
            continue
        if line.startswith("= control target key end"):
            in_key = False
            continue
        if in_key:
            continue
        m = _BUNDLE_RE.match(line)
        if m:
            raw.append([int(m.group(1), 0), m.group(2), m.group(3), line])
        elif raw:
            raw[-1][3] += "\n" + line
    bundles = []
    for pos, (addr, tag, depth, body) in enumerate(raw):
        if addr != pos:
            raise ValueError(f"bundle addresses are not consecutive: position {pos} has "
                             f"address {addr:#x} (dump format changed?)")
        bundles.append(_parse_bundle(pos, tag, depth, body))
    return bundles


def find_loops(bundles: list[Bundle], delay_slots: int) -> list[Loop]:
    loops = []
    for b in bundles:
        if b.tag != "LB":
            continue
        started = set(b.starts)
        branch = next((x for x in bundles[b.index:] if x.branch_target in started), None)
        if branch is None:
            raise ValueError(f"LB bundle {b.index:#x} (regions {sorted(started)}) has no "
                             "back-branch targeting one of its regions")
        region = branch.branch_target
        end = min(branch.index + delay_slots, len(bundles) - 1)
        region_end = next((x.index for x in bundles[b.index:] if region in x.ends), None)
        counts: collections.Counter = collections.Counter()
        for x in bundles[b.index:end + 1]:
            counts.update(op_class(op) for op in x.ops)
        counts["bundles_empty"] = sum(x.empty for x in bundles[b.index:end + 1])
        loops.append(Loop(region=region, depth=b.depth, start=b.index, branch=branch.index,
                          end=end, region_end=region_end, op_counts=dict(counts),
                          dma_issues=counts.get("dma", 0)))
    # Nesting by containment of iteration spans.
    for lp in loops:
        outer = [o for o in loops if o is not lp and o.start <= lp.start and lp.end <= o.end]
        if outer:
            parent = max(outer, key=lambda o: o.start)
            lp.parent = parent.region
            parent.children.append(lp.region)
    return loops


def parse_schedule(text: str, fmt: DumpFormat | None = None) -> Schedule:
    """The schedule of a `*-final_bundles.txt` dump written by the libtpu `fmt` describes
    (default: the installed one, `dump_format()`)."""
    fmt = fmt or dump_format()
    bundles = parse_bundles(text)
    return Schedule(bundles=bundles, loops=find_loops(bundles, fmt.delay_slots),
                    delay_slots=fmt.delay_slots)


def total_from_schedule_analysis(text: str) -> int | None:
    """`total scheduled bundles` of a `*-schedule-analysis_final_bundles.txt` dump."""
    m = _TOTAL_RE.search(text)
    return int(m.group(1)) if m else None


@dataclasses.dataclass
class Utilization:
    units: list[str]          # e.g. ["MXU", "XLU", "VALU", ..., "SALU"]
    capacity: list[int]       # slots per bundle of each unit
    rows: list[list[int]]     # slots used, one row per bundle

    def busiest(self, start: int, end: int) -> tuple[str, int, int]:
        """Over bundles [start, end]: (unit, slots used, bundles that unit alone needs) for the
        unit that alone needs the most bundles (slots used / slots per bundle, rounded up)."""
        best = ("", 0, 0)
        for u, (name, cap) in enumerate(zip(self.units, self.capacity)):
            used = sum(r[u] for r in self.rows[start:end + 1])
            need = -(-used // cap) if cap else 0
            if need > best[2]:
                best = (name, used, need)
        return best

    def totals(self, start: int, end: int) -> dict[str, int]:
        return {name: sum(r[u] for r in self.rows[start:end + 1])
                for u, name in enumerate(self.units)}


def parse_utilization(text: str) -> Utilization:
    """A `*-final_hlo-static-per-bundle-utilization.txt` dump."""
    lines = text.splitlines()
    try:
        i = next(k for k, ln in enumerate(lines) if ln.startswith("== CAPAC"))
        j = next(k for k, ln in enumerate(lines) if ln.startswith("== UTILIZATION"))
    except StopIteration:
        raise ValueError("not a per-bundle utilization dump (no CAPACTIY/UTILIZATION header)")
    units = [u.strip() for u in lines[i + 1].split(",")]
    capacity = [int(x) for x in lines[i + 2].split()]
    rows = [[int(x) for x in ln.split()] for ln in lines[j + 1:] if ln.strip()]
    if len(capacity) != len(units) or any(len(r) != len(units) for r in rows):
        raise ValueError("utilization rows do not match the unit list")
    return Utilization(units, capacity, rows)


@dataclasses.dataclass(frozen=True)
class Allocation:
    number: int
    shape: str
    space: str
    size: int
    tag: str


def parse_allocations(text: str) -> list[Allocation]:
    """Allocations listed in a `*-pre-finalize-registers-and-allocations.txt` dump."""
    out, seen = [], set()
    for m in _ALLOC_RE.finditer(text):
        num = int(m.group(1))
        if num in seen:
            continue
        seen.add(num)
        out.append(Allocation(num, m.group(2), m.group(3), int(m.group(4), 0), m.group(5) or ""))
    return out


def vmem_bytes(allocations: list[Allocation]) -> int:
    """Sum of the VMEM allocations: an upper bound on the kernel's VMEM footprint (scoped
    allocations of disjoint regions may share space); vector spill slots that register allocation
    adds later are not in this table."""
    return sum(a.size for a in allocations if a.space == "vmem")
