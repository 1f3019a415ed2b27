"""bench/static/: the static schedule analysis (parse, dump, analyze, cli).

- The parser on a small final-bundles dump per supported libtpu version, checked into
  tests/data/libtpu-<version>/ (made by `make_test_dump` below from `minimal_loop_build(width=1)`:
  one loop of 8 iterations over a VMEM-resident input; both dumps are parsed whatever libtpu is
  installed), plus synthetic schedules for nesting and the main-loop rule.
- A minimal loop kernel compiled for real (libtpu) at two widths: each iteration loads, scales
  and stores `width` vregs, so when the work doubles the loop's vld/vst counts double exactly
  and, the body being store-bound (one vector store slot per bundle), the bundles per iteration
  grow by at least the extra stores.
- The whole path (`python -m bench static`, JSON) on jax's bundled paged_attention at one decode
  shape.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from bench import static
from bench.static import cli, dump
from bench.static import parse as static_parse

DATA = pathlib.Path(__file__).parent / "data"
VERSIONS = tuple(static_parse.FORMATS)


def mini_files(version: str) -> dict[str, pathlib.Path]:
    """The checked-in dump of `minimal_loop_build(width=1)` written by libtpu `version`."""
    d = DATA / f"libtpu-{version}"
    return {k: d / f"static_mini_loop.{k}.txt" for k in ("final_bundles", "allocations",
                                                          "utilization")}


# ---------------------------------------------------------------------------------------------
# Minimal kernels (also imported by the compile subprocess through their "module:function" name).

def minimal_loop_build(*, width: int, trips: int = 8, chip: str = "v5p"):
    """(fn, args): a kernel whose loop iteration i loads x[i] ([8*width, 128] f32, `width`
    vregs), scales it by 2 and stores it to o[i]. No DMA inside the loop (in/out are whole-array
    VMEM blocks)."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    rows = 8 * width

    def kernel(x_ref, o_ref):
        # x_ref, o_ref: [trips, rows, 128] f32 VMEM
        def body(i, carry):
            o_ref[i] = x_ref[i] * 2.0
            return carry

        jax.lax.fori_loop(0, trips, body, 0)

    def fn(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            name="static_mini_loop",
        )(x)

    return fn, (jax.ShapeDtypeStruct((trips, rows, 128), jnp.float32),)


def make_test_dump():  # pragma: no cover - run by hand to refresh tests/data
    """Write the checked-in dump for the installed libtpu (tests/data/libtpu-<version>/):
    `python -c 'from tests.test_bench_static import *; make_test_dump()'`, then read the expected
    numbers below off it (`MINI_EXPECTED`)."""
    import tempfile

    out = mini_files(static_parse.libtpu_version())
    out["final_bundles"].parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        recs = dump.compile_and_dump(
            [{"id": 0, "factory": "tests.test_bench_static:minimal_loop_build",
              "kwargs": {"width": 1}, "chip": "v5p"}], tmp)
        files = recs[0]["calls"][0]["files"]
        for key, dest in (("bundles", out["final_bundles"]), ("allocations", out["allocations"]),
                          ("utilization", out["utilization"])):
            text = pathlib.Path(files[key]).read_text()
            if key == "allocations":  # keep only the allocation table
                text = "\n".join(ln for ln in text.splitlines() if "#allocation" in ln
                                 and "[shape" in ln) + "\n"
            dest.write_text(text)


# ---------------------------------------------------------------------------------------------
# The parser on the checked-in dumps (v5p, minimal_loop_build(width=1)), one per libtpu version.
# The two schedules are the same bundle for bundle (op and register names aside); the bounds
# checks' comments and the allocation numbering differ. Numbers read off the dump files.

MINI_EXPECTED = {
    # VMEM allocations: internal scratch, the single-buffered [8, 8, 128] f32 input and output
    # windows (0.0.50.1 numbers a scoped sflag #allocation1 first).
    "0.0.42.1": {"vmem": {1: 0x9000, 2: 0x8000, 5: 0x8000},
                 "bounds_check_comment": "for %26 = dma.hbm_to_vmem [thread:$0]"},
    "0.0.50.1": {"vmem": {2: 0x9000, 3: 0x8000, 6: 0x8000},
                 "bounds_check_comment": "for dma.hbm_to_vmem\n"},
}


@pytest.fixture(scope="module", params=VERSIONS)
def mini(request):
    version = request.param
    files = mini_files(version)
    sched = static_parse.parse_schedule(files["final_bundles"].read_text(),
                                        static_parse.FORMATS[version])
    return version, files, sched


def test_every_supported_version_has_a_checked_in_dump():
    assert set(MINI_EXPECTED) == set(VERSIONS)
    for v in VERSIONS:
        assert all(f.exists() for f in mini_files(v).values()), v


def test_checked_in_dump_bundles(mini):
    version, files, mini = mini
    # Addresses 0 .. 0x2b, one bundle each, continuation lines (DMA / bounds-check comments)
    # folded into their bundle.
    assert mini.total_bundles == 44
    assert [b.index for b in mini.bundles] == list(range(44))
    assert mini.empty_bundles == sum(b.text.split("{", 1)[1].startswith("}")
                                     for b in mini.bundles)
    assert mini.bundles[0x2b].tag == "PF" and mini.bundles[0x2b].empty
    # Comments are stripped before ops are counted: the bounds checks' comments name the DMA
    # they guard, but only the two real DMAs (window in, window out) are ops.
    assert MINI_EXPECTED[version]["bounds_check_comment"] in mini.bundles[0xc].text
    ops = [op for b in mini.bundles for op in b.ops]
    assert ops.count("dma.hbm_to_vmem") == 1 and ops.count("dma.vmem_to_hbm") == 1
    assert ops.count("shalt.err") == 4
    assert mini.delay_slots == 4 and mini.delay_slot_violations() == []
    # The per-bundle utilization dump has one row per bundle.
    util = static_parse.parse_utilization(files["utilization"].read_text())
    assert len(util.rows) == mini.total_bundles
    assert "SALU" in util.units and "VSTORE" in util.units


def test_checked_in_dump_loop(mini):
    _, _, mini = mini
    assert len(mini.loops) == 1
    lp = mini.loops[0]
    # LB at 0x16 starts region 42; `sbr.rel ... target = $region42` at 0x1a; its 4 delay slots
    # run to 0x1e, which holds the loop-exit code predicated off while looping.
    assert (lp.region, lp.depth, lp.start, lp.branch, lp.end) == (42, 1, 0x16, 0x1a, 0x1e)
    assert lp.bundles == 9
    assert lp.region_bundles == 6          # `End region 42` sits between branch and delay slots
    body_ops = [op for b in mini.bundles[lp.start:lp.end + 1] for op in b.ops]
    assert body_ops.count("vld") == 1 and body_ops.count("vst") == 1
    assert body_ops.count("vmul.f32") == 1
    assert lp.dma_issues == 0 and lp.parent is None
    assert mini.main_loop() is lp          # no DMA-issuing loop: the biggest loop


@pytest.mark.parametrize("version", VERSIONS)
def test_checked_in_allocations(version):
    allocs = static_parse.parse_allocations(mini_files(version)["allocations"].read_text())
    vmem = {a.number: a.size for a in allocs if a.space == "vmem"}
    assert vmem == MINI_EXPECTED[version]["vmem"]
    assert static_parse.vmem_bytes(allocs) == 0x9000 + 2 * 8 * 8 * 128 * 4


@pytest.mark.parametrize("version", VERSIONS)
def test_analyze_dump_on_checked_in_dump(version):
    files = mini_files(version)
    ml = static.MainLoop(call_name="static_mini_loop", bytes_per_iteration=4096, iterations=8)
    r = static.analyze_dump(files["final_bundles"].read_text(), chip="v5p", main_loop=ml,
                            allocations_text=files["allocations"].read_text(),
                            utilization_text=files["utilization"].read_text(), libtpu=version)
    from pallas_ops.chips import CHIPS

    per_cycle = CHIPS["v5p"].hbm_bytes_per_cycle_per_core
    assert r.libtpu == version
    assert r.bundles_per_iteration == 9
    assert r.hbm_cycles_per_iteration == pytest.approx(4096 / per_cycle)
    assert r.bound == ("issue" if 9 > 4096 / per_cycle else "HBM")
    assert r.bound_cycles_per_iteration == max(9, 4096 / per_cycle)
    # 8 iterations at the bound + the 35 bundles outside the loop, at the v5p clock.
    cycles = 8 * max(9, 4096 / per_cycle) + (44 - 9)
    assert r.predicted_cycles == pytest.approx(cycles)
    assert r.predicted_us == pytest.approx(cycles / CHIPS["v5p"].clock_hz * 1e6)
    assert r.vmem_bytes == 0x9000 + 0x10000
    # Utilization rows 0x16..0x1e (same in both dumps): 13 SALU slots (7 bundles' worth at 2 per
    # bundle), one VLOAD, VALU and VSTORE slot each, nothing else.
    assert r.main_loop_slots == {"MXU": 0, "XLU": 0, "VALU": 1, "VPOP": 0, "EUP": 0, "VLOAD": 1,
                                 "VLOAD:FILL": 0, "VSTORE": 1, "VSTORE:SPILL": 0, "SALU": 13}
    assert r.busiest_unit == "SALU" and r.busiest_unit_bundles == 7


class _FakeModule:
    """A bench module for `_analyze_calls` / `_limits`: fixed bytes and flops, 1 or 2 calls."""

    def __init__(self, calls: int, hbm_bytes: int, flops: int):
        self._calls, self._bytes, self._flops = calls, hbm_bytes, flops

    def main_loop(self, shape, *, chip):
        ml = static.MainLoop(call_name="static_mini_loop", bytes_per_iteration=4096, iterations=8)
        return ml if self._calls == 1 else (ml,) * self._calls

    def hbm_bytes(self, shape):
        return self._bytes

    def flops(self, shape):
        return self._flops


def _mini_record(version: str, calls: int) -> dict:
    files = {k: str(v) for k, v in (("bundles", mini_files(version)["final_bundles"]),
                                    ("allocations", mini_files(version)["allocations"]),
                                    ("utilization", mini_files(version)["utilization"]))}
    return {"calls": [{"name": f"static_mini_loop.{i + 1}", "op_name": "", "files": files}
                      for i in range(calls)]}


@pytest.mark.parametrize("version", VERSIONS)
def test_two_calls_add_up_and_limits(version, monkeypatch):
    """A program of two kernels (as a peer's two RPA calls per draft layer): the k-th MainLoop
    takes the k-th call of its name, predicted times add; the limit is the larger floor."""
    from bench.static import analysis
    from pallas_ops.chips import CHIPS

    monkeypatch.setattr(static_parse, "libtpu_version", lambda: version)
    one = static.Result(kernel="k", shape="s", chip="v5p")
    assert analysis._analyze_calls(one, _mini_record(version, 1), _FakeModule(1, 0, 0), None)
    two = static.Result(kernel="peer_k", shape="s", chip="v5p")
    assert analysis._analyze_calls(two, _mini_record(version, 2), _FakeModule(2, 0, 0), None)
    assert [c["call"] for c in two.calls] == ["static_mini_loop.1", "static_mini_loop.2"]
    assert two.predicted_us == pytest.approx(2 * one.predicted_us)
    assert not one.calls
    # Asking for more calls than the program has is an error, not a silent half.
    three = static.Result(kernel="k", shape="s", chip="v5p")
    assert not analysis._analyze_calls(three, _mini_record(version, 2), _FakeModule(3, 0, 0), None)
    assert three.status == "error" and "call 2 of 3" in three.reason
    spec = CHIPS["v5p"]
    # HBM-limited: 1 MB against 1 MFLOP; MXU-limited: the other way round.
    for nbytes, flops, kind in ((10 ** 6, 10 ** 6, "HBM"), (10, 10 ** 12, "MXU")):
        r = dataclasses.replace(one)
        analysis._limits(r, _FakeModule(1, nbytes, flops), None)
        hbm, mxu = nbytes / spec.hbm_bytes_per_s * 1e6, flops / spec.bf16_flops * 1e6
        assert (r.hbm_floor_us, r.mxu_floor_us) == (pytest.approx(hbm), pytest.approx(mxu))
        assert r.limit_kind == kind and r.limit_us == pytest.approx(max(hbm, mxu))
        assert r.efficiency == pytest.approx(max(hbm, mxu) / r.predicted_us)


def test_whole_program_takes_the_larger_of_cost_model_and_bytes():
    from bench.static import analysis
    from pallas_ops.chips import CHIPS

    bw = CHIPS["v5p"].hbm_bytes_per_s
    for seconds, nbytes in ((1e-3, 1e6), (1e-6, 1e10)):
        r = static.Result(kernel="peer_x", shape="s", chip="v5p", fusions=7,
                          xla_cost={"optimal_seconds": seconds, "bytes accessed": nbytes})
        analysis._whole_program(r)
        assert r.bound == "XLA" and "7 fusions" in r.reason
        assert r.predicted_us == pytest.approx(max(seconds * 1e6, nbytes / bw * 1e6))
    r = static.Result(kernel="peer_x", shape="s", chip="v5p")
    analysis._whole_program(r)
    assert r.status == "error"


def test_side_by_side_pairs_shapes_and_marks_the_fastest():
    def row(kernel, shape, us, limit=10.0):
        return static.Result(kernel=kernel, shape=shape, chip="v5p", bound="HBM",
                             predicted_us=us, limit_us=limit, efficiency=limit / us,
                             peer=kernel.startswith("peer_"))

    failed = static.Result(kernel="peer_p", shape="e", chip="v5p", status="error", peer=True)
    results = [row("paged", "a", 20.0), row("peer_p", "a", 40.0), row("paged", "b", 50.0),
               row("peer_p", "b", 25.0), row("paged", "c", 30.0),   # c: no peer, no row
               row("block", "d", 12.5), row("peer_q", "d", 100.0),
               row("paged", "e", 20.0), failed]                     # e: the peer fails
    text = cli.side_by_side(results)
    tables = text.split("\n\n")
    assert len(tables) == 2 and "| paged | peer_p |" in tables[0]
    assert "| block | peer_q |" in tables[1]
    assert "| a | v5p | 10.0 | **20.0 (50%)** | 40.0 (25%) | paged | 0.50x |" in text
    assert "| b | v5p | 10.0 | 50.0 (20%) | **25.0 (40%)** | peer_p | 2.00x |" in text
    assert "| c |" not in text and "| d | v5p | 10.0 | **12.5 (80%)** |" in text
    assert "| e | v5p | 10.0 | **20.0 (50%)** | n/a | paged | - |" in text


def test_from_json_merges_runs(tmp_path, capsys):
    """Runs written with --json (e.g. two halves of --all in parallel) print as one table."""
    a = static.Result(kernel="paged", shape="a", chip="v5p", bound="HBM", predicted_us=20.0,
                      limit_us=10.0, limit_kind="HBM", efficiency=0.5, issue_over_hbm=0.5,
                      libtpu="0.0.50.1")
    b = static.Result(kernel="peer_p", shape="a", chip="v5p", bound="issue", predicted_us=40.0,
                      limit_us=10.0, limit_kind="HBM", efficiency=0.25, issue_over_hbm=2.0,
                      peer=True, libtpu="0.0.50.1")
    paths = []
    for i, r in enumerate((a, b)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps([r.to_dict()]))
    assert cli.main(["--from-json", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "| paged | a | v5p | - | - | HBM (0.50x) | 20.0 |" in out
    assert "| a | v5p | 10.0 | **20.0 (50%)** | 40.0 (25%) | paged | 0.50x |" in out
    # A later run's row replaces an earlier one of the same kernel, shape and chip.
    again = tmp_path / "again.json"
    again.write_text(json.dumps([dataclasses.replace(b, predicted_us=10.0).to_dict()]))
    rows = cli.load_results([*map(str, paths), str(again)])
    assert [(r.kernel, r.predicted_us) for r in rows] == [("paged", 20.0), ("peer_p", 10.0)]


def test_dump_format_table():
    assert all(f.delay_slots == 4 for f in static_parse.FORMATS.values())
    assert static_parse.dump_format("0.0.42.1").jax == "0.10.2"
    assert static_parse.dump_format("0.0.50.1").jax == "0.12.0.1"
    # An unknown version gets the newest entry (the CLI warns); so does no libtpu at all.
    assert not static_parse.is_supported("9.9.9") and not static_parse.is_supported(None)
    assert static_parse.dump_format("9.9.9") is static_parse.FORMATS[static_parse.NEWEST]
    assert static_parse.NEWEST == "0.0.50.1"


# ---------------------------------------------------------------------------------------------
# Synthetic schedules: nesting, depth, continuation lines, the main-loop rule, bad input.

_SYNTH = """\
= control target key start
LB: loop body
= control target key end

     0   :  { %s1 = smov 0 }
   0x1 LB: > { %s2 = sadd.s32 1, %s1 } /* Start region 10 */
   0x2   : > { %3 = dma.hbm_to_vmem [thread:$0] /*hbm=*/%s2 /*
multi-line descriptor
*/ }
   0x3 LB: >> { %v4 = vld [vmem:[%s2]] } /* Start region 20 :: Start region 21 */
   0x4   : >> { %5 = sbr.rel (%p1) target = $region20 }
   0x5   : >> { %v6 = vadd.f32 %v4, %v4 }
   0x6   :  {}
   0x7   :  {}
   0x8   : >> { %7 = vst [vmem:[%s2]] %v6 }
second line of bundle 8 /* End region 20 :: End region 21 */
   0x9   : > { %8 = sbr.rel (!%p2) target = $region10 }
   0xa   :  {}
   0xb   :  {}
   0xc   :  {}
   0xd   :  { %9 = shalt.err (!%p3) /* BoundsCheck for %10 = dma.hbm_to_vmem */ } /* End region 10 */
   0xe PF:  {} /* End region 1 :: Start/End empty region 30 */
"""


def test_synthetic_nesting_and_main_loop():
    s = static_parse.parse_schedule(_SYNTH)
    assert s.total_bundles == 15 and s.delay_slot_violations() == []
    outer, inner = s.loop(10), s.loop(20)
    assert (outer.depth, outer.start, outer.branch, outer.end, outer.bundles) == (1, 1, 9, 13, 13)
    assert (inner.depth, inner.start, inner.branch, inner.end, inner.bundles) == (2, 3, 4, 8, 6)
    assert inner.region_bundles == 6 and outer.region_bundles == 13
    assert inner.parent == 10 and outer.children == [20]
    # Only the outer loop issues a DMA (the bounds check's comment at 0xd names one, but is no
    # op): it is the main loop although the inner one is deeper; depth= overrides.
    assert outer.dma_issues == 1 and inner.dma_issues == 0
    assert s.main_loop() is outer
    assert s.main_loop(depth=2) is inner
    with pytest.raises(ValueError, match="no loop at depth 3"):
        s.main_loop(depth=3)
    assert s.bundles[0xe].starts == [30] and s.bundles[0xe].ends == [1, 30]
    assert inner.op_counts["vector"] == 3 and inner.op_counts["bundles_empty"] == 2


def test_synthetic_deepest_dma_loop_wins():
    text = _SYNTH.replace("%v4 = vld [vmem:[%s2]]", "%v4 = dma.hbm_to_vmem %s2")
    s = static_parse.parse_schedule(text)
    assert s.main_loop() is s.loop(20)


def test_synthetic_dma_only_inner_loop_is_not_main():
    # A page-issue loop (DMAs and scalar work only) nested in the block loop: the block loop,
    # which does the vector work, stays the main loop.
    text = (_SYNTH.replace("%v4 = vld [vmem:[%s2]]", "%4 = dma.hbm_to_vmem %s2")
            .replace("%v6 = vadd.f32 %v4, %v4", "%s6 = sadd.s32 1, %s2")
            .replace("%7 = vst [vmem:[%s2]] %v6", "%s7 = smov 0"))
    # Without vector work anywhere: the deepest DMA-issuing loop.
    s = static_parse.parse_schedule(text)
    assert s.loop(20).dma_issues == 1 and s.loop(10).dma_issues == 2
    assert s.main_loop() is s.loop(20)
    s = static_parse.parse_schedule(
        text.replace("%s2 = sadd.s32 1, %s1", "%s2 = sadd.s32 1, %s1  ;;  %v9 = vmax.f32 %v8, %v8"))
    assert s.loop(10).op_counts["vector"] == 1 and "vector" not in s.loop(20).op_counts
    assert s.main_loop() is s.loop(10)
    # The inner loop's back-branch is no forward branch.
    assert s.forward_branches(s.loop(10)) == []


def test_inner_trips_scale_nested_loop_bodies():
    ml = static.MainLoop(call_name="x", bytes_per_iteration=1 << 20, iterations=4,
                         loop_depth=1, inner_trips=(4,))
    r = static.analyze_dump(_SYNTH, chip="v5p", main_loop=ml)
    assert r.main_loop_static_bundles == 13 and r.main_loop_inner_loops == [[20, 6]]
    assert r.bundles_per_iteration == 13 + 3 * 6
    assert r.bound == "HBM" and r.reason == ""
    r = static.analyze_dump(_SYNTH, chip="v5p", main_loop=dataclasses.replace(ml, inner_trips=None))
    assert r.bundles_per_iteration == 13 and "counted once" in r.reason
    r = static.analyze_dump(_SYNTH, chip="v5p", main_loop=dataclasses.replace(ml, inner_trips=(1, 2)))
    assert r.bundles_per_iteration == 13 and "ignored" in r.reason
    r = static.analyze_dump(_SYNTH, chip="v5p", main_loop=dataclasses.replace(ml, inner_trips=(0,)))
    assert r.bundles_per_iteration == 13 - 6


_BRANCHY = """\
     0   :  { %s1 = smov 0 }
   0x1 LB: > { %s2 = sadd.s32 1, %s1 } /* Start region 10 */
   0x2   : > { %3 = sbr.rel (%p1) target = $region12 } /* Start region 11 */
   0x3   : > { %v4 = vadd.f32 %v1, %v1 }
   0x4   : > {}
   0x5   : > {}
   0x6   : > {} /* End region 11 */
   0x7   : > { %v5 = vmul.f32 %v4, %v4 }
   0x8   : > { %v6 = vmul.f32 %v5, %v5 }
   0x9   : > { %v7 = vmul.f32 %v6, %v6 }
   0xa   : > { %v8 = vld [vmem:[%s2]] } /* Start region 12 */
   0xb   : > { %9 = sbr.rel (!%p2) target = $region10 }
   0xc   : > {}
   0xd   : > {}
   0xe   : > {}
   0xf   : > {} /* End region 12 :: End region 10 */
  0x10   :  {}
"""


def test_taken_branches_skip_guarded_code():
    s = static_parse.parse_schedule(_BRANCHY)
    (lp,) = s.loops
    assert lp.bundles == 15 and s.forward_branches(lp) == [(2, 12, 3)]
    assert s.iteration_bundles(lp) == 15
    # Taken: the branch and its 4 delay slots run, the 3 bundles before region 12 do not.
    assert s.iteration_bundles(lp, taken=(True,)) == 12
    ml = static.MainLoop(call_name="x", bytes_per_iteration=64, iterations=2,
                         taken_branches=(True,))
    assert static.analyze_dump(_BRANCHY, chip="v5p", main_loop=ml).bundles_per_iteration == 12
    r = static.analyze_dump(_BRANCHY, chip="v5p",
                            main_loop=dataclasses.replace(ml, taken_branches=(True, False)))
    assert r.bundles_per_iteration == 15 and "ignored" in r.reason


def test_parser_rejects_inconsistent_dumps():
    with pytest.raises(ValueError, match="not consecutive"):
        static_parse.parse_bundles(_SYNTH.replace("   0x7   :  {}", "   0x17   :  {}"))
    with pytest.raises(ValueError, match="no back-branch"):
        static_parse.parse_schedule(_SYNTH.replace("target = $region20", "target = $region99"))
    # A branch whose region does not end `delay_slots` bundles later is reported.
    moved = _SYNTH.replace("} /* End region 10 */", "}").replace(
        "   0xb   :  {}", "   0xb   :  {} /* End region 10 */")
    assert static_parse.parse_schedule(moved).delay_slot_violations() == [9]
    with pytest.raises(ValueError):
        static_parse.parse_utilization("no header here")


def test_strip_comments_nested():
    assert static_parse.strip_comments("a /* b /* c */ d */ e /* f */") == "a  e "


def test_missing_kernel_module_is_skipped_with_reason():
    r = static.analyze_many([("no_such_kernel", "x", "v5p")])[0]
    assert r.status == "skipped" and "bench/kernels/no_such_kernel.py not present" in r.reason
    table = cli.markdown_table([r])
    assert "no_such_kernel" in table and "skipped" in table


def test_peer_tokamax_rpa_schedule_counts():
    """Without tokamax the module is skipped with a reason; with it (the peers venv), its
    schedule counts follow tokamax's seq / q / k loops and the op's heuristic block sizes."""
    from bench import kernels

    mod, reason = kernels.load_module("peer_tokamax_rpa")
    if mod is None:
        assert "tokamax" in reason
        pytest.skip(reason)
    assert mod.heuristics_config()["bkv_sz"] == 512
    decode = mod.main_loop(mod.find("decode-b8-ctx4096-p16"), chip="v5p")
    assert (decode.call_name, decode.iterations) == ("RPAd-nhs-p16-b8-q1-k512", 8)
    assert decode.bytes_per_iteration == 8 * 512 * 2 * 8 * 128 * 2     # 8 slots x 512 keys
    mixed = mod.main_loop(mod.find("mixed-b8-ctx4096-p16"), chip="v5p")
    assert (mixed.call_name, mixed.iterations) == ("RPAm-nhs-p16-b2-q128-k512", 36)
    assert not any(s.cache_dtype for s in mod.shapes())


# ---------------------------------------------------------------------------------------------
# Real compiles (libtpu): the minimal loop at doubling widths, and the whole path on the peer.

def _require_libtpu():
    from tests.tpu_harness import require_libtpu

    require_libtpu()


def test_libtpu_version_is_supported():
    _require_libtpu()
    import importlib.metadata

    version = static_parse.libtpu_version()
    assert static_parse.is_supported(version), (
        f"libtpu {version} is not in bench/static/parse.py FORMATS "
        f"({', '.join(static_parse.FORMATS)}): re-check the dump-format facts there (delay "
        "slots, line format, file names), the bench modules' hot paths (`--loops`), write "
        "tests/data/libtpu-<version>/ with make_test_dump(), then add an entry")
    # The hot paths of jax's bundled kernel follow jax's version: it must be the one the entry
    # was checked with.
    assert importlib.metadata.version("jax") == static_parse.FORMATS[version].jax


@pytest.mark.tpu_compile
def test_minimal_loop_bundles_track_doubled_work(tmp_path):
    _require_libtpu()
    widths = (8, 16, 32)
    jobs = [{"id": i, "factory": "tests.test_bench_static:minimal_loop_build",
             "kwargs": {"width": w}, "chip": "v5p"} for i, w in enumerate(widths)]
    recs = dump.compile_and_dump(jobs, str(tmp_path))
    got = {}
    for i, w in enumerate(widths):
        assert recs[i]["error"] is None, recs[i]
        (call,) = recs[i]["calls"]
        assert call["name"].startswith("static_mini_loop")
        s = static_parse.parse_schedule(pathlib.Path(call["files"]["bundles"]).read_text())
        util = static_parse.parse_utilization(
            pathlib.Path(call["files"]["utilization"]).read_text())
        assert s.delay_slot_violations() == []
        assert len(s.loops) == 1
        lp = s.main_loop()
        ops = [op for b in s.bundles[lp.start:lp.end + 1] for op in b.ops]
        # The work per iteration is exactly `w` loads, multiplies and stores ...
        assert ops.count("vld") == w and ops.count("vst") == w and ops.count("vmul.f32") == w
        # ... and v5p has one vector-store slot per bundle: the stores bind the iteration.
        unit, used, need = util.busiest(lp.start, lp.end)
        assert (unit, used, need) == ("VSTORE", w, w)
        got[w] = lp.bundles
    # Store-bound: bundles per iteration = stores + a constant, so doubling the work from w to
    # 2w adds exactly w bundles.
    assert got[16] - got[8] == 8 and got[32] - got[16] == 16, got
    assert got[8] >= 8


@pytest.mark.tpu_compile
def test_whole_path_on_jax_paged_attention(tmp_path, capsys):
    _require_libtpu()
    shape = "decode-b8-ctx1024-p16"
    out = tmp_path / "static.json"
    rc = cli.main(["--kernel", "peer_jax_paged", "--shape", shape,
                      "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    (r,) = json.loads(out.read_text())
    assert r["status"] == "ok", r
    assert r["call"].startswith("paged_attention")
    assert f"| peer_jax_paged | {shape} | v5p |" in printed
    # The main loop is the KV-block loop (depth 2, inside the grid loop), which issues the K and
    # V page DMAs: 8 pages each, for the first block and for the next one.
    assert r["main_loop_depth"] == 2
    loop = next(lp for lp in r["loops"] if lp["region"] == r["main_loop_region"])
    assert loop["dma_issues"] % 16 == 0 and loop["dma_issues"] >= 16
    # K + V of 128 tokens x 128 dims in bf16 = 64 KiB per iteration: ~83 cycles of one v5p
    # TensorCore's HBM bandwidth. jax's kernel is issue-bound. libtpu 0.0.42.1 (jax 0.10.2):
    # 762 bundles, the static span (the brief's "about 750"). libtpu 0.0.50.1 (jax 0.12.0.1):
    # span 673, of which the first-block prefetch (261 bundles behind a branch) runs once per
    # call: 412 on the declared hot path. The bands leave room for scheduler changes, not for a
    # parser bug.
    from pallas_ops.chips import CHIPS

    assert r["hbm_bytes_per_iteration"] == 65536
    assert r["hbm_cycles_per_iteration"] == pytest.approx(
        65536 / CHIPS["v5p"].hbm_bytes_per_cycle_per_core)
    assert r["libtpu"] == static_parse.libtpu_version()
    band, span, ratio = {"0.0.42.1": ((650, 900), (650, 900), 7),
                         "0.0.50.1": ((350, 500), (580, 800), 4)}[r["libtpu"]]
    assert band[0] <= r["bundles_per_iteration"] <= band[1]
    assert span[0] <= r["main_loop_static_bundles"] <= span[1]
    assert r["bound"] == "issue" and r["issue_over_hbm"] > ratio
    assert r["iterations"] == 8 * 8 * (1024 // 128) and r["cores"] == 2
    assert r["predicted_us"] > r["hbm_floor_us"] > 0
    # Decode does little matmul work: the limit is the HBM floor, efficiency below 1.
    assert 0 < r["mxu_floor_us"] < r["hbm_floor_us"] == r["limit_us"]
    assert r["limit_kind"] == "HBM" and r["efficiency"] == pytest.approx(
        r["limit_us"] / r["predicted_us"])
    assert r["xla_cost"] and r["peer"]
    # Its VMEM: double-buffered K and V blocks (2 x 2 x 8 pages x 16 x 128 bf16 = 128 KiB) + more.
    assert 128 * 1024 < r["vmem_bytes"] < CHIPS["v5p"].vmem_bytes
