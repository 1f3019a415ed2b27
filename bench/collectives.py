"""The collectives a compiled SPMD program contains, and its per-device memory, from its HLO text.

For programs AOT-compiled for a TPU slice (`pallas_ops.aot.compile_sharded`) or any other
`jax.stages.Compiled`:

    records = collectives(compiled)            # or collectives(hlo_text, mesh=mesh)
    mem = memory_report(compiled)
    print(markdown_report(compiled))           # both, as markdown tables

`collectives` reads the compiled (optimised, scheduled) HLO: what the device will run, after XLA's
own partitioning, combining and fusion, not what the program asked for.

What is counted, once each:
- the ops all-reduce, all-gather, reduce-scatter, all-to-all, ragged-all-to-all,
  collective-permute and collective-broadcast;
- an async pair (`all-gather-start` / `all-gather-done`, and the like) once, named by its
  `-start`, as async; so is an op wrapped in `async-start` / `async-done` (its `calls=`);
- a collective inside a fusion is reported as the fusion. TPU's "all-reduce-scatter" (a kCustom
  fusion calling a computation `%all-reduce-scatter...` that holds an all-reduce and the slice of
  it this device keeps: what a reduce-scatter becomes on TPU) is one record of kind
  "all-reduce-scatter", its inner all-reduce not counted again.

Byte convention: `bytes` is the size of the op's RESULT on one device (for a pair, of the `-done`'s
result; for a fusion, of the fusion's result): all-reduce -> the reduced array, all-gather -> the
gathered array, reduce-scatter / all-reduce-scatter -> this device's shard, all-to-all and
collective-permute -> what this device receives. `operand_bytes` is the operands' size, where the
text gives their shapes. Sizes are logical (elements x dtype bytes), not the TPU layout's padded
tiles. These are not link bytes: a ring all-reduce over n devices sends about 2(n-1)/n times its
result over the links.

Loops: a collective in a while loop's body (or condition, or a computation those call) lists the
while instructions around it in `while_loops`, innermost first, and is counted once, as it
appears in the text, not once per iteration: XLA's TPU text does not give trip counts.

Replica groups are the compiled program's partition ids (positions in the mesh's flattened device
order, `mesh.devices.flat`); all three text forms are read: explicit `{{0,1},{2,3}}`, iota
`[2,2]<=[4]T(1,0)` and mesh-axes `mesh['data'=2,'model'=2] {'model'}` (the form jaxlib 0.12
prints; XLA's own collectives print it with made-up axis names `'axis_0'`, so `mesh_axes` is
derived from the groups, not copied from the text). With the jax `Mesh` (given, or taken from the
compiled program's input shardings) `mesh_axes` names the mesh axes a group's members differ
along; for collective-permute, those its source-target pairs differ along.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                  "collective-permute", "collective-broadcast")

_DTYPE_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
               "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16,
               "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0}

_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=]*)\]")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_CALLEE_RE = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                        r"=%?([^\s,}]+)")
_BRANCHES_RE = re.compile(r"\bbranch_computations=\{([^}]*)\}")


# -- HLO text -----------------------------------------------------------------------------------


def _dtype_bits(dtype: str) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    if dtype.startswith("f8"):
        return 8
    if dtype.startswith("f4"):
        return 4
    m = re.fullmatch(r"[suf](\d+)", dtype)
    if m:
        return int(m.group(1))
    raise ValueError(f"unknown HLO element type {dtype!r}")


def arrays_of(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of an HLO shape string, layouts ignored: 'f32[8,256]{1,0:T(8,128)}' ->
    [('f32', (8, 256))]; a tuple shape gives each of its arrays."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(shape):
        dims = dims.replace("<=", "")
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def shape_bytes(shape: str) -> int:
    """Logical bytes of an HLO shape string (every array of a tuple; padding ignored)."""
    return sum(math.ceil(math.prod(dims) * _dtype_bits(dtype) / 8) for dtype, dims in arrays_of(shape))


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    open_, close = text[start], {"(": ")", "{": "}", "[": "]"}[text[start]]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == open_:
            depth += 1
        elif text[i] == close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {open_!r} in HLO text: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Split at the commas not nested in brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


@dataclasses.dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]          # operand names (no '%')
    operand_shapes: list[str]    # inline operand shapes where the text prints them, else ""
    attrs: str
    computation: str


def _parse_instr(line: str, computation: str) -> _Instr | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    name, rest = m.group(1), m.group(2)
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    end = _closing(rest, m.end() - 1)
    operands, shapes = [], []
    for part in _split_top(rest[m.end():end - 1]):
        names = re.findall(r"%([^\s,()]+)", part)
        operands.append(names[-1] if names else part)
        shapes.append(part[:part.rfind("%")].strip() if names and "[" in part else "")
    return _Instr(name, shape, opcode, operands, shapes, rest[end:], computation)


@dataclasses.dataclass
class _Module:
    instrs: dict[str, _Instr]                   # by name (unique within a module)
    computations: dict[str, list[_Instr]]
    entry: str | None
    callers: dict[str, tuple[_Instr, str]]      # callee computation -> (calling instr, how)
    num_partitions: int | None


def _parse_module(text: str) -> _Module:
    instrs, comps, callers = {}, {}, {}
    entry, current = None, None
    m = re.search(r"\bnum_partitions=(\d+)", text)
    num_partitions = int(m.group(1)) if m else None
    for line in text.splitlines():
        if current is None:
            h = _HEADER_RE.match(line)
            if h and not line.startswith((" ", "\t")) and not line.startswith("HloModule"):
                current = h.group(2)
                comps[current] = []
                if h.group(1):
                    entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        ins = _parse_instr(line, current)
        if ins is None:
            continue
        comps[current].append(ins)
        instrs[ins.name] = ins
    for ins in instrs.values():
        for how, callee in _CALLEE_RE.findall(ins.attrs):
            if how == "to_apply" and ins.opcode != "call":
                continue   # a reducer (all-reduce, reduce, scatter, ...), not a place ops run in
            kind = {"body": "while", "condition": "while"}.get(how, how)
            if how == "calls":
                kind = "fusion" if ins.opcode == "fusion" else (
                    "async" if ins.opcode.startswith("async") else "call")
            callers.setdefault(callee, (ins, kind))
        for branches in _BRANCHES_RE.findall(ins.attrs):
            for callee in re.findall(r"%?([^\s,]+)", branches):
                callers.setdefault(callee, (ins, "conditional"))
    return _Module(instrs, comps, entry, callers, num_partitions)


# -- replica groups ------------------------------------------------------------------------------


def _iota(dims, reshape, perm) -> np.ndarray:
    a = np.arange(math.prod(reshape)).reshape(reshape)
    if perm:
        a = a.transpose(perm)
    return a.reshape(dims)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _parse_iota(text: str) -> np.ndarray | None:
    m = re.match(r"\s*\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    if not m:
        return None
    return _iota(_ints(m.group(1)), _ints(m.group(2)), _ints(m.group(3) or ""))


def _mesh_axes_groups(mesh_text: str, device_ids: str | None, axes_text: str) -> list[list[int]]:
    """Expand XLA's MeshAxesReplicaGroupList text (`mesh['a'=2,'b'=2] {'b'}`, sub-axes
    `'b':(pre)size`) to explicit groups, as `MeshAxesReplicaGroupList::flattened_replica_groups`."""
    axes = re.findall(r"'?([^'=,\s]+)'?\s*=\s*(\d+)", mesh_text)
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    if device_ids:
        ids = _parse_iota(device_ids)
        ids = np.array(_ints(device_ids)) if ids is None else ids.reshape(-1)
        mesh = ids.reshape(sizes)
    else:
        mesh = np.arange(math.prod(sizes)).reshape(sizes)
    refs = []     # (axis index, pre_size, size) with pre_size None for the whole axis
    for part in _split_top(axes_text):
        m = re.fullmatch(r"'?([^':]+)'?(?::\((\d+)\)(\d+))?", part.strip())
        if not m:
            raise ValueError(f"cannot read the mesh axis {part!r} of replica groups")
        ax = names.index(m.group(1))
        refs.append((ax, int(m.group(2)) if m.group(2) else None,
                     int(m.group(3)) if m.group(3) else sizes[ax]))
    reshape, grouped = [], []
    for ax, size in enumerate(sizes):
        mine = sorted((r for r in refs if r[0] == ax), key=lambda r: r[1] or 1)
        if not mine:
            reshape.append(size)
            continue
        dims, agg, prefix = [], {}, 1
        for r in mine:
            pre = r[1] or 1
            if pre != prefix:
                dims.append(pre // prefix)
                prefix = pre
            agg[r] = len(dims)
            dims.append(r[2])
            prefix *= r[2]
        if prefix != size:
            dims.append(size // prefix)
        offset = len(reshape)
        reshape.extend(dims)
        grouped.extend(offset + agg[r] for r in refs if r[0] == ax)   # in the text's order
    rest = [i for i in range(len(reshape)) if i not in grouped]
    per_group = math.prod(reshape[i] for i in grouped)
    arr = mesh.reshape(reshape).transpose(rest + grouped).reshape(-1, per_group)
    return arr.tolist()


def replica_groups_of(attrs: str, num_partitions: int | None = None) -> list[list[int]] | None:
    """The groups of an instruction's `replica_groups=` attribute, in any of its text forms;
    None when it has none. `{}` (every device in one group) needs `num_partitions`."""
    m = re.search(r"\breplica_groups=", attrs)
    if not m:
        return None
    text = attrs[m.end():]
    if text.startswith("{"):
        body = text[:_closing(text, 0)]
        groups = [_ints(g) for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        if not groups:
            return [list(range(num_partitions))] if num_partitions else None
        return groups
    if text.startswith("["):
        arr = _parse_iota(text)
        return arr.tolist() if arr is not None else None
    if text.startswith("mesh["):
        end = _closing(text, 4)
        mesh_text, rest, device_ids = text[5:end - 1], text[end:], None
        d = re.match(r",\s*device_ids=", rest)
        if d:
            close = _closing(rest, d.end())
            device_ids, rest = rest[d.end() + 1:close - 1], rest[close:]
        rest = rest.lstrip()
        if not rest.startswith("{"):
            return None
        return _mesh_axes_groups(mesh_text, device_ids, rest[1:_closing(rest, 0) - 1])
    if text.startswith("maximal_mesh"):
        return [_ints(text[:text.index("]")])]
    return None


def source_target_pairs_of(attrs: str) -> list[tuple[int, int]] | None:
    m = re.search(r"\bsource_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if not m:
        return None
    return [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", m.group(1))]


def _axes_spanned(sets, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    n = math.prod(sizes)
    varying = set()
    for members in sets:
        members = [int(p) for p in members]
        if any(p >= n for p in members):
            raise ValueError(f"partition id {max(members)} outside a mesh of {n} devices")
        coords = np.array([np.unravel_index(p, sizes) for p in members])
        varying |= {names[i] for i in range(len(names)) if len(set(coords[:, i])) > 1}
    return tuple(a for a in names if a in varying)


# -- records ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str                       # one of COLLECTIVE_OPS, or "all-reduce-scatter"
    name: str                       # the HLO instruction (a pair's -start, a fused form's fusion)
    shapes: tuple[str, ...]         # result arrays, e.g. ("f32[8,256]",)
    bytes: int                      # result bytes on one device (module docstring)
    operand_bytes: int | None       # operand bytes on one device, where the text gives them
    is_async: bool                  # a -start/-done pair, or async-start wrapped
    computation: str                # the HLO computation it runs in (past fusions and wrappers)
    while_loops: tuple[str, ...]    # enclosing while instructions, innermost first
    groups: tuple[tuple[int, ...], ...] | None   # replica groups (partition ids); for
    #                                 collective-permute its (source, target) pairs
    mesh_axes: tuple[str, ...] | None            # mesh axes the groups span, given a mesh
    fused_in: str | None = None     # the fusion a collective sits in (not all-reduce-scatter)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(s[:s.index("[")] for s in self.shapes)

    @property
    def in_loop(self) -> bool:
        return bool(self.while_loops)

    @property
    def group_size(self) -> int | None:
        if not self.groups or self.kind == "collective-permute":
            return None
        return len(self.groups[0])


def _mesh_shape_of(obj) -> dict[str, int] | None:
    """The mesh shape of a compiled program's first NamedSharding input (or output)."""
    import jax

    for attr in ("input_shardings", "output_shardings"):
        try:
            tree = getattr(obj, attr)
        except Exception:
            continue
        for leaf in jax.tree.leaves(tree):
            mesh = getattr(leaf, "mesh", None)
            if mesh is not None and getattr(mesh, "shape", None):
                return dict(mesh.shape)
    return None


def _hlo_text(compiled_or_text) -> str:
    if isinstance(compiled_or_text, str):
        return compiled_or_text
    text = compiled_or_text.as_text()
    if not text:
        raise ValueError("the compiled program gave no HLO text")
    return text


def _outer(mod: _Module, ins: _Instr):
    """Past fusion and async wrappers: (instr whose result is the op's, fusion it is in, async?,
    computation that runs it, kind override)."""
    result, fused_in, is_async, kind = ins, None, False, None
    comp = ins.computation
    while comp in mod.callers and mod.callers[comp][1] in ("fusion", "async"):
        caller, how = mod.callers[comp]
        if how == "fusion":
            if re.match(r"all-reduce-scatter", comp) and ins.opcode.startswith("all-reduce"):
                kind, result = "all-reduce-scatter", caller
            else:
                fused_in = caller.name
        else:
            is_async = True
        comp = caller.computation
    return result, fused_in, is_async, comp, kind


def _while_loops(mod: _Module, comp: str) -> tuple[str, ...]:
    loops, seen = [], set()
    while comp in mod.callers and comp not in seen:
        seen.add(comp)
        caller, how = mod.callers[comp]
        if how == "while":
            loops.append(caller.name)
        comp = caller.computation
    return tuple(loops)


def _operand_bytes(mod: _Module, ins: _Instr) -> int | None:
    total = 0
    for name, inline in zip(ins.operands, ins.operand_shapes):
        shape = inline or (mod.instrs[name].shape if name in mod.instrs else None)
        if shape is None:
            return None
        total += shape_bytes(shape)
    return total


def collectives(compiled_or_hlo_text, mesh=None) -> list[Collective]:
    """Every collective of a compiled program (a `jax.stages.Compiled` or its `as_text()`), in
    text order; see the module docstring for what is counted and the byte convention.

    `mesh`: a `jax.sharding.Mesh` (or a {axis: size} dict in the mesh's order) to name the axes
    the replica groups span; by default the mesh of the compiled program's input shardings.
    """
    text = _hlo_text(compiled_or_hlo_text)
    if mesh is None and not isinstance(compiled_or_hlo_text, str):
        mesh_shape = _mesh_shape_of(compiled_or_hlo_text)
    elif mesh is None or isinstance(mesh, dict):
        mesh_shape = mesh
    else:
        mesh_shape = dict(mesh.shape)
    mod = _parse_module(text)
    by_operand = {}
    for ins in mod.instrs.values():
        if ins.opcode.endswith("-done") and ins.operands:
            by_operand[ins.operands[0]] = ins
    out = []
    for comp_instrs in mod.computations.values():
        for ins in comp_instrs:
            op = ins.opcode
            is_start = op.endswith("-start") and op[:-len("-start")] in COLLECTIVE_OPS
            if not (op in COLLECTIVE_OPS or is_start):
                continue
            kind = op[:-len("-start")] if is_start else op
            result, fused_in, is_async, comp, override = _outer(mod, ins)
            operand_of = result
            if is_start:
                is_async = True
                done = by_operand.get(ins.name)
                result = done if done is not None else ins
            shapes = tuple(f"{d}[{','.join(map(str, s))}]" for d, s in arrays_of(result.shape))
            if kind == "collective-permute":
                pairs = source_target_pairs_of(ins.attrs)
                groups = tuple(pairs) if pairs is not None else None
            else:
                g = replica_groups_of(ins.attrs, mod.num_partitions)
                groups = tuple(tuple(x) for x in g) if g is not None else None
            axes = None
            if mesh_shape and groups:
                axes = _axes_spanned(groups, mesh_shape)
            out.append(Collective(
                kind=override or kind, name=(operand_of if override else ins).name,
                shapes=shapes, bytes=shape_bytes(result.shape),
                operand_bytes=_operand_bytes(mod, operand_of),
                is_async=is_async, computation=comp, while_loops=_while_loops(mod, comp),
                groups=groups, mesh_axes=axes, fused_in=fused_in))
    return out


# -- memory ------------------------------------------------------------------------------------


_MEMORY_FIELDS = {
    "argument_bytes": "argument_size_in_bytes",
    "output_bytes": "output_size_in_bytes",
    "temp_bytes": "temp_size_in_bytes",
    "alias_bytes": "alias_size_in_bytes",
    "generated_code_bytes": "generated_code_size_in_bytes",
    "peak_bytes": "peak_memory_in_bytes",
}


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """One device's memory for a compiled program, from `compiled.memory_analysis()`; a field is
    None where this jax / backend does not report it (all None when there is no analysis).
    Sizes are of the device's layouts, so TPU tile padding counts (f32[8,100] takes [8,128])."""
    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    alias_bytes: int | None           # output bytes that reuse argument buffers (donation)
    generated_code_bytes: int | None
    peak_bytes: int | None            # XLA's peak estimate (`peak_memory_in_bytes`) if given

    @property
    def total_bytes(self) -> int | None:
        """argument + output - alias + temp + generated code: everything the program holds at
        once, if nothing is freed early; None if a field is missing."""
        parts = (self.argument_bytes, self.output_bytes, self.alias_bytes, self.temp_bytes,
                 self.generated_code_bytes)
        if any(p is None for p in parts):
            return None
        a, o, al, t, g = parts
        return a + o - al + t + g


def memory_report(compiled) -> MemoryReport:
    """`MemoryReport` of a `jax.stages.Compiled` (or of a `memory_analysis()` result)."""
    stats = compiled
    if hasattr(compiled, "memory_analysis"):
        try:
            stats = compiled.memory_analysis()
        except Exception:        # not implemented for this backend / executable
            stats = None
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    values = {}
    for field, attr in _MEMORY_FIELDS.items():
        v = getattr(stats, attr, None) if stats is not None else None
        values[field] = int(v) if isinstance(v, (int, np.integer)) and v >= 0 else None
    return MemoryReport(**values)


# -- markdown ----------------------------------------------------------------------------------


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _fmt_groups(c: Collective) -> str:
    if c.groups is None:
        return "-"
    if c.kind == "collective-permute":
        return "pairs " + " ".join(f"{a}->{b}" for a, b in c.groups)
    return "{" + ",".join("{" + ",".join(map(str, g)) + "}" for g in c.groups) + "}"


def collectives_table(records: list[Collective]) -> str:
    """The collectives as a markdown table, with a total per kind ('x' marks ops in a loop body,
    counted once however often the loop runs)."""
    lines = ["| op | kind | result | bytes/device | async | mesh axes | groups | computation | loop |",
             "|---|---|---|---:|---|---|---|---|---|"]
    for c in records:
        lines.append(
            f"| `{c.name}` | {c.kind} | {' '.join(c.shapes)} | {c.bytes} ({_fmt_bytes(c.bytes)}) "
            f"| {'yes' if c.is_async else 'no'} "
            f"| {','.join(c.mesh_axes) if c.mesh_axes else ('-' if c.mesh_axes is None else 'none')} "
            f"| {_fmt_groups(c)} | `{c.computation}` "
            f"| {'x ' + ','.join(c.while_loops) if c.while_loops else ''} |")
    if not records:
        lines.append("| (none) | | | 0 | | | | | |")
    kinds = sorted({c.kind for c in records})
    for k in kinds:
        rs = [c for c in records if c.kind == k]
        total = sum(c.bytes for c in rs)
        lines.append(f"| **total {k}** | {len(rs)} ops | | {total} ({_fmt_bytes(total)}) "
                     f"| | | | | {sum(c.in_loop for c in rs)} in loops |")
    return "\n".join(lines)


def memory_table(report: MemoryReport) -> str:
    """One device's memory as a markdown table."""
    rows = [("arguments", report.argument_bytes), ("outputs", report.output_bytes),
            ("aliased (output in an argument's buffer)", report.alias_bytes),
            ("temporaries", report.temp_bytes), ("generated code", report.generated_code_bytes),
            ("total (arguments + outputs - aliased + temporaries + code)", report.total_bytes),
            ("XLA peak estimate", report.peak_bytes)]
    lines = ["| memory per device | bytes | |", "|---|---:|---|"]
    lines += [f"| {label} | {'-' if v is None else v} | {_fmt_bytes(v)} |" for label, v in rows]
    return "\n".join(lines)


def markdown_report(compiled, mesh=None) -> str:
    """Both tables for a compiled program: its collectives, then one device's memory."""
    return (collectives_table(collectives(compiled, mesh=mesh)) + "\n\n"
            + memory_table(memory_report(compiled)))
