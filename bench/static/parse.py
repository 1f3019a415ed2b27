"""Parser of libtpu's final VLIW schedule dumps (`*-final_bundles.txt`): pure Python, no jax.

With `LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, every compiled TPU op (a Pallas kernel is a
`tpu_custom_call` named after its HLO instruction, e.g. `paged_attention.1`) leaves in DIR:

    <id>-<instr>-<NN>-final_bundles.txt                        the final schedule (parsed here)
    <id>-<instr>-<NN>-schedule-analysis_final_bundles.txt      "total scheduled bundles: N"
    <id>-<instr>-<NN>-pre-finalize-registers-and-allocations.txt   the allocation table
    <id>-<instr>-<NN>-final_hlo-static-per-bundle-utilization.txt  slots used per unit per bundle

Format facts pinned for libtpu 0.0.42.1 (jax/jaxlib 0.10.2); it is libtpu's internal format and may
change with its version (`tests/test_bench_static.py` checks them on a checked-in dump and on a
fresh compile):

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
- Branches: `%n = sbr.rel (pred) target = $regionR`. A branch takes effect after
  `DELAY_SLOTS` = 4 further bundles (every branch in the dumps seen ends its own region exactly 4
  bundles later; the slots are filled with useful or predicated-off work or `{}`).
- A loop is an `LB:` bundle that starts region R plus the back-branch (the first later
  `sbr.rel ... target = $regionR`). One iteration executes the bundles from the LB bundle through
  the back-branch's last delay slot: that is `Loop.bundles`. The marker `End region R` itself is
  NOT a reliable end: it can fall before the back-branch (jax's paged_attention: 9 bundles early)
  or between the branch and its delay slots; `Loop.region_bundles` (LB .. `End region R`) is kept
  for comparison with hand counts. `Loop.bundles` is the static span: code under a forward branch
  (a `pl.when` the compiler did not if-convert) counts even when the branch jumps over it, and a
  nested loop's body counts once; `Schedule.iteration_bundles` walks one path instead.
- DMA issue ops are `dma.hbm_to_vmem`, `dma.vmem_to_hbm`, `dma.hbm_to_smem`, ...; waits are
  `dma.done.wait`. Bounds checks are `shalt.err` ops guarded by scalar compares (they are in the
  final program and cost issue slots). A bounds check's comment repeats the DMA it guards
  (`for %26 = dma.hbm_to_vmem ...`): comments are stripped before ops are counted.
- Per-bundle unit use (`*-final_hlo-static-per-bundle-utilization.txt`): `== CAPACTIY:` (sic),
  a line of unit names (`MXU, XLU, VALU, VPOP, EUP, VLOAD, VLOAD:FILL, VSTORE, VSTORE:SPILL, SALU`
  on v5p), a line of slots per bundle, `== UTILIZATION:`, then one line of slot counts per bundle,
  in bundle order.
- Allocations: lines `#allocationN [shape = '...', space=vmem|smem|sflag|..., size = 0x..., ...]`;
  `size` already covers all buffering levels of a pipelined window.
"""
from __future__ import annotations

import collections
import dataclasses
import re

DELAY_SLOTS = 4
LIBTPU_VERSION_PINNED = "0.0.42.1"


def libtpu_version() -> str | None:
    """The installed libtpu's version (None if it is not installed)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None

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
    end: int                # index of the last bundle of one iteration (branch + DELAY_SLOTS)
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
        """Branches whose own region does not end exactly DELAY_SLOTS bundles later (indices).

        Every branch in the dumps seen so far ends the region holding it DELAY_SLOTS bundles
        after it; a non-empty result means the format (or the delay) changed: re-check
        DELAY_SLOTS before trusting `Loop.bundles`.
        """
        bad = []
        for b in self.bundles:
            if b.branch_target is None:
                continue
            k = b.index + DELAY_SLOTS
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
                out.append((b.index, b.branch_target, max(t - (b.index + DELAY_SLOTS + 1), 0)))
        return out

    def iteration_bundles(self, loop: Loop, *, taken=(), trips: dict[int, int] | None = None
                          ) -> int:
        """Bundles of one iteration of `loop` along one path.

        taken: for each forward branch of `self.forward_branches(loop)`, in that order, whether
            it is taken on the path (a taken branch still runs its DELAY_SLOTS bundles, then
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
                    slots = min(DELAY_SLOTS, lp.end - i)
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


def find_loops(bundles: list[Bundle]) -> list[Loop]:
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
        end = min(branch.index + DELAY_SLOTS, len(bundles) - 1)
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


def parse_schedule(text: str) -> Schedule:
    bundles = parse_bundles(text)
    return Schedule(bundles=bundles, loops=find_loops(bundles))


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
