"""Sharded AOT compiles for multi-chip TPU slices (`pallas_ops.aot`), and what `bench.collectives`
reads from them: the collectives, their bytes and mesh axes, and one device's memory.

AOT needs no TPU and no real devices: these run in the ordinary pytest process (libtpu describes
the slice). The parser is also checked on small hand-written HLO texts, for the forms a TPU
compile of these toy programs does not produce (async pairs, async wrappers, iota groups).
"""
import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from bench import collectives as C
from pallas_ops import aot
from tests.tpu_harness import require_libtpu

B, H, F = 8, 256, 512          # f32 and tile-aligned: no layout padding in the byte counts
F32 = jnp.float32


def _mesh(topology, sizes):
    require_libtpu()
    return aot.tpu_mesh(topology, sizes)


def _tp_program(mesh, *, reduce: bool):
    """x[B, H] replicated @ w[H, F] (columns over "model") -> @ w2[F, H] (rows over "model"),
    then, with `reduce`, psum over "model"; without, each device's partial product is returned
    (stacked along B)."""
    def local(x, w, w2):
        y = (x @ w) @ w2
        return jax.lax.psum(y, "model") if reduce else y

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "model"), P("model", None)),
                       out_specs=P() if reduce else P("model"), check_vma=False)
    args = (aot.sharded_spec((B, H), F32, mesh, P()),
            aot.sharded_spec((H, F), F32, mesh, P(None, "model")),
            aot.sharded_spec((F, H), F32, mesh, P("model", None)))
    return fn, args


# -- topologies and meshes ----------------------------------------------------------------------


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology,count,kind", [
    ("v5p:2x2x1", 4, "TPU v5"), ("v5p:2x2x2", 8, "TPU v5"), ("v5p:2x4x1", 8, "TPU v5"),
    ("v6e:2x2", 4, "TPU v6 lite"), ("v6e:2x4", 8, "TPU v6 lite"),
])
def test_slice_devices(topology, count, kind):
    require_libtpu()
    devices = aot.tpu_slice_devices(topology)
    assert len(devices) == count
    assert len({d.id for d in devices}) == count
    assert {d.platform for d in devices} == {"tpu"}
    assert {d.device_kind for d in devices} == {kind}


@pytest.mark.tpu_compile
def test_mesh_axes_and_devices():
    mesh = _mesh("v5p:2x2x2", {"data": 2, "model": 4})
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(
        d.id for d in aot.tpu_slice_devices("v5p:2x2x2"))


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v99:2x2", "v5p-8", "v5p:3x3x3", "", "v5p:2x2x1x1x1"])
def test_unknown_topology_is_refused(topology):
    require_libtpu()
    with pytest.raises(ValueError):
        aot.tpu_slice_devices(topology)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("sizes,match", [
    ({"data": 2, "model": 4}, "multiply to 8"), ({"model": 3}, "multiply to 3"),
    ({"data": 4, "model": 0}, "positive ints"), ({}, "at least one"),
])
def test_mesh_sizes_must_match_the_slice(sizes, match):
    require_libtpu()
    with pytest.raises(ValueError, match=match):
        aot.tpu_mesh("v5p:2x2x1", sizes)


@pytest.mark.tpu_compile
def test_specs_must_be_sharded_over_the_mesh():
    mesh = _mesh("v5p:2x2x1", {"data": 1, "model": 4})
    other = _mesh("v6e:2x2", {"data": 1, "model": 4})
    with pytest.raises(ValueError, match="NamedSharding"):
        aot.lower_sharded(lambda a: a + 1, jax.ShapeDtypeStruct((8, 128), F32), mesh=mesh)
    with pytest.raises(ValueError, match="another mesh"):
        aot.lower_sharded(lambda a: a + 1, aot.sharded_spec((8, 128), F32, other), mesh=mesh)


# -- compiled programs ----------------------------------------------------------------------------


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_psum_is_one_all_reduce_of_the_result(topology):
    mesh = _mesh(topology, {"data": 1, "model": 4})
    fn, args = _tp_program(mesh, reduce=True)
    compiled = aot.compile_sharded(fn, *args, mesh=mesh)
    found = C.collectives(compiled)
    assert [c.kind for c in found] == ["all-reduce"], C.collectives_table(found)
    (ar,) = found
    assert ar.bytes == B * H * 4
    assert ar.shapes == ("f32[8,256]",)
    assert ar.dtypes == ("f32",)
    assert ar.mesh_axes == ("model",)
    assert ar.group_size == 4 and len(ar.groups) == 1
    assert not ar.in_loop

    mem = C.memory_report(compiled)
    shard_bytes = B * H * 4 + H * (F // 4) * 4 + (F // 4) * H * 4
    assert mem.argument_bytes == shard_bytes
    assert mem.output_bytes == B * H * 4
    assert mem.generated_code_bytes and mem.generated_code_bytes > 0
    table = C.markdown_report(compiled)
    assert "all-reduce" in table and str(shard_bytes) in table


@pytest.mark.tpu_compile
def test_no_psum_no_collective():
    mesh = _mesh("v5p:2x2x1", {"data": 1, "model": 4})
    fn, args = _tp_program(mesh, reduce=False)
    compiled = aot.compile_sharded(fn, *args, mesh=mesh)
    assert C.collectives(compiled) == []
    assert "(none)" in C.collectives_table([])


@pytest.mark.tpu_compile
def test_data_and_model_axes_on_8_chips():
    """On a (data 2, model 4) mesh of the 8-chip v5p slice the psum over "model" is 2 groups of 4
    partitions, and the batch sharding over "data" halves its bytes."""
    mesh = _mesh("v5p:2x2x2", {"data": 2, "model": 4})

    def local(x, w):
        return jax.lax.psum(x @ w, "model")

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data", "model"), P("model", None)),
                       out_specs=P("data"), check_vma=False)
    compiled = aot.compile_sharded(fn, aot.sharded_spec((2 * B, H), F32, mesh, P("data", "model")),
                                   aot.sharded_spec((H, F), F32, mesh, P("model", None)), mesh=mesh)
    (ar,) = C.collectives(compiled)
    assert ar.kind == "all-reduce"
    assert ar.bytes == B * F * 4
    assert ar.mesh_axes == ("model",)
    assert len(ar.groups) == 2 and ar.group_size == 4
    assert sorted(p for g in ar.groups for p in g) == list(range(8))


@pytest.mark.tpu_compile
def test_all_gather_bytes():
    mesh = _mesh("v5p:2x2x1", {"data": 1, "model": 4})

    def local(x):
        return jax.lax.all_gather(x, "model", axis=0, tiled=True) * 2.0

    fn = jax.shard_map(local, mesh=mesh, in_specs=P("model"), out_specs=P(), check_vma=False)
    compiled = aot.compile_sharded(fn, aot.sharded_spec((4 * B, H), F32, mesh, P("model")),
                                   mesh=mesh)
    found = C.collectives(compiled)
    assert [c.kind for c in found] == ["all-gather"], C.collectives_table(found)
    assert found[0].bytes == 4 * B * H * 4
    assert found[0].operand_bytes == B * H * 4
    assert found[0].mesh_axes == ("model",)
    assert C.memory_report(compiled).argument_bytes == B * H * 4


@pytest.mark.tpu_compile
def test_collective_in_a_loop_body_is_marked():
    mesh = _mesh("v5p:2x2x1", {"data": 1, "model": 4})

    def local(x, n):
        return jax.lax.fori_loop(0, n, lambda i, a: jax.lax.psum(a, "model") * 0.25, x)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("model"), P()), out_specs=P("model"),
                       check_vma=False)
    compiled = aot.compile_sharded(fn, aot.sharded_spec((4 * B, H), F32, mesh, P("model")),
                                   aot.sharded_spec((), jnp.int32, mesh), mesh=mesh)
    (ar,) = C.collectives(compiled)
    assert ar.kind == "all-reduce" and ar.bytes == B * H * 4
    assert ar.in_loop and len(ar.while_loops) == 1
    assert ar.computation != "main" and "x " + ar.while_loops[0] in C.collectives_table([ar])


def _add_kernel(x_ref, y_ref, o_ref):
    # x_ref, y_ref, o_ref: [8, 128] VMEM tiles
    o_ref[...] = x_ref[...] + y_ref[...]


def _pallas_add(x, y):
    m, n = x.shape
    spec = pl.BlockSpec((8, 128), lambda i, j: (i, j))
    return pl.pallas_call(_add_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          grid=(m // 8, n // 128), in_specs=[spec, spec], out_specs=spec,
                          name="sharded_pallas_add")(x, y)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("topology", ["v5p:2x2x1", "v6e:2x2"])
def test_pallas_kernel_inside_shard_map(topology):
    mesh = _mesh(topology, {"data": 1, "model": 4})

    def local(x, y):
        return jax.lax.psum(_pallas_add(x, y), "model")

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "model"),) * 2, out_specs=P(),
                       check_vma=False)
    spec = aot.sharded_spec((16, 4 * 256), F32, mesh, P(None, "model"))
    compiled = aot.compile_sharded(fn, spec, spec, mesh=mesh)
    text = compiled.as_text()
    assert "sharded_pallas_add" in text and "tpu_custom_call" in text
    (ar,) = C.collectives(compiled)
    assert ar.kind == "all-reduce" and ar.bytes == 16 * 256 * 4
    assert C.memory_report(compiled).argument_bytes == 2 * 16 * 256 * 4


# -- the parser on hand-written HLO ---------------------------------------------------------------

_ASYNC_HLO = """\
HloModule m, is_scheduled=true, num_partitions=4

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%wrapped_reduce_scatter (p: f32[64,128]) -> f32[16,128] {
  %p = f32[64,128]{1,0} parameter(0)
  ROOT %rs = f32[16,128]{1,0} reduce-scatter(%p), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
}

%body (t: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[8,128]{1,0} get-tuple-element(%t), index=1
  %ars = f32[8,128]{1,0} all-reduce-start(%v), channel_id=4, replica_groups={{0,2},{1,3}}, use_global_device_ids=true, to_apply=%add
  %ard = f32[8,128]{1,0} all-reduce-done(%ars)
  ROOT %out = (s32[], f32[8,128]{1,0}) tuple(%i, %ard)
}

%cond (t: (s32[], f32[8,128])) -> pred[] {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x: f32[8,128], y: f32[64,128], z: bf16[8,128]) -> f32[32,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %y = f32[64,128]{1,0} parameter(1)
  %z = bf16[8,128]{1,0} parameter(2)
  %ags = (f32[8,128]{1,0}, f32[32,128]{1,0}) all-gather-start(%x), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0','axis_1'}, dimensions={0}, use_global_device_ids=true
  %agd = f32[32,128]{1,0} all-gather-done(%ags)
  %as = ((f32[64,128]{1,0}), f32[16,128]{1,0}, u32[]) async-start(%y), calls=%wrapped_reduce_scatter
  %ad = f32[16,128]{1,0} async-done(%as), calls=%wrapped_reduce_scatter
  %ar2 = (f32[8,128]{1,0}, bf16[8,128]{1,0}) all-reduce(%x, %z), channel_id=2, replica_groups={}, to_apply=%add
  %cps = (f32[8,128]{1,0}, f32[8,128]{1,0}, u32[], u32[]) collective-permute-start(%x), channel_id=5, source_target_pairs={{0,1},{1,0},{2,3},{3,2}}
  %cpd = f32[8,128]{1,0} collective-permute-done(%cps)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,128]{1,0}) tuple(%zero, %cpd)
  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[32,128]{1,0} copy(%agd)
}
"""


def test_async_pairs_and_wrappers_are_counted_once():
    found = C.collectives(_ASYNC_HLO, mesh={"data": 2, "model": 2})
    by_name = {c.name: c for c in found}
    assert sorted(by_name) == ["ags", "ar2", "ars", "cps", "rs"]

    ag = by_name["ags"]
    assert (ag.kind, ag.bytes, ag.operand_bytes, ag.is_async) == ("all-gather", 32 * 128 * 4,
                                                                   8 * 128 * 4, True)
    assert ag.groups == ((0, 1, 2, 3),) and ag.mesh_axes == ("data", "model")

    rs = by_name["rs"]
    assert (rs.kind, rs.bytes, rs.is_async, rs.computation) == ("reduce-scatter", 16 * 128 * 4,
                                                                 True, "main")
    assert rs.groups == ((0, 1, 2, 3),)

    ar2 = by_name["ar2"]
    assert ar2.shapes == ("f32[8,128]", "bf16[8,128]") and ar2.dtypes == ("f32", "bf16")
    assert ar2.bytes == 8 * 128 * 4 + 8 * 128 * 2 and not ar2.is_async
    assert ar2.groups == ((0, 1, 2, 3),)          # {} is every partition

    ars = by_name["ars"]
    assert ars.kind == "all-reduce" and ars.is_async and ars.bytes == 8 * 128 * 4
    assert ars.computation == "body" and ars.while_loops == ("loop",)
    assert ars.mesh_axes == ("data",)             # partitions 0,2 differ in the major axis

    cp = by_name["cps"]
    assert cp.kind == "collective-permute" and cp.bytes == 8 * 128 * 4 and cp.is_async
    assert cp.groups == ((0, 1), (1, 0), (2, 3), (3, 2)) and cp.mesh_axes == ("model",)
    assert not cp.in_loop and cp.group_size is None

    table = C.collectives_table(found)
    assert table.count("\n| `") == 5 and "x loop" in table


def test_all_reduce_scatter_fusion_counts_once():
    text = """\
HloModule m, num_partitions=4

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %s = bf16[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: bf16[256,1024]) -> bf16[256,256] {
  %input.1 = bf16[256,1024]{1,0:T(8,128)(2,1)} parameter(0)
  %all-reduce.5 = bf16[256,1024]{1,0:T(8,128)(2,1)} all-reduce(%input.1), channel_id=6, replica_groups={{0,1,2,3}}, use_global_device_ids=true, to_apply=%add
  %c = s32[] constant(0)
  ROOT %dynamic-slice.7 = bf16[256,256]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.5, %c, %c), dynamic_slice_sizes={256,256}
}

ENTRY %main.0_spmd (param.2: bf16[256,1024]) -> bf16[256,256] {
  %param.2 = bf16[256,1024]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %fusion.1 = bf16[256,256]{1,0:T(8,128)(2,1)} fusion(%param.2), kind=kCustom, calls=%all-reduce-scatter.1
}
"""
    (c,) = C.collectives(text, mesh={"data": 1, "model": 4})
    assert (c.kind, c.name, c.bytes, c.operand_bytes) == ("all-reduce-scatter", "fusion.1",
                                                           256 * 256 * 2, 256 * 1024 * 2)
    assert c.computation == "main.0_spmd" and c.mesh_axes == ("model",)


@pytest.mark.parametrize("attrs,groups", [
    ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['a'=2,'b'=2] {'a'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['a'=8] {'a':(1)2}", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups=mesh['a'=8] {'a':(4)2}", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    ("replica_groups=mesh['a'=2,'b'=2], device_ids=([2,2]<=[2,2]T(1,0)) {'b'}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['a'=2,'b'=2], device_ids=({{0,2},{1,3}}) {'a'}", [[0, 1], [2, 3]]),
    ("replica_groups={{0,3},{1,2}}", [[0, 3], [1, 2]]),
    ("channel_id=1", None),
])
def test_replica_group_forms(attrs, groups):
    assert C.replica_groups_of(attrs + ", dimensions={0}", num_partitions=4) == groups


def test_shape_bytes():
    assert C.shape_bytes("f32[8,256]{1,0:T(8,128)}") == 8192
    assert C.shape_bytes("(bf16[4,4]{1,0}, s8[3]{0}, pred[])") == 32 + 3 + 1
    assert C.shape_bytes("s4[3]{0}") == 2
    assert C.shape_bytes("f8e4m3fn[16]{0}") == 16


class _Stats:
    argument_size_in_bytes = 100
    output_size_in_bytes = 20
    temp_size_in_bytes = 7
    alias_size_in_bytes = 20
    generated_code_size_in_bytes = 3


class _Compiled:
    def __init__(self, stats):
        self._stats = stats

    def memory_analysis(self):
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


def test_memory_report_fields_and_gaps():
    full = C.memory_report(_Compiled(_Stats()))
    assert (full.argument_bytes, full.output_bytes, full.temp_bytes, full.alias_bytes,
            full.generated_code_bytes) == (100, 20, 7, 20, 3)
    assert full.peak_bytes is None                 # not in this (older) stats object
    assert full.total_bytes == 100 + 20 - 20 + 7 + 3
    for empty in (C.memory_report(_Compiled(None)),
                  C.memory_report(_Compiled(NotImplementedError("no analysis"))),
                  C.memory_report(_Compiled([]))):
        assert empty == C.MemoryReport(None, None, None, None, None, None)
        assert empty.total_bytes is None
        assert "| arguments | - |" in C.memory_table(empty)
    assert C.memory_report(_Compiled([_Stats()])) == full
    assert "| arguments | 100 |" in C.memory_table(full)
