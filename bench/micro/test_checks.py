"""The harness's own checks, off the clock (no `benchmark` fixture; skipped by --benchmark-only).

The TPU-only code paths (catalogue-shape checks on the device, roofline figures) run here at the
tiny shapes through the xla twins, so a CPU run proves them too, and every check is shown to
reject a wrong output.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import shapes as S
from bench.micro import cases, harness
from pallas_ops.chips import CHIPS


def _corrupt(out, fill):
    """Every float element replaced by `fill`, every int shifted by one."""
    def bad(x):
        x = jnp.asarray(x)
        return jnp.full_like(x, fill) if jnp.issubdtype(x.dtype, jnp.floating) else x + 1
    return jax.tree.map(bad, out)


@pytest.mark.parametrize("kernel", [k for k, v in cases.KERNELS.items() if v.cpu])
def test_checks_accept_the_twin_and_reject_a_wrong_output(kernel):
    k = cases.KERNELS[kernel]
    shape = k.tiny[0]
    fn = jax.jit(k.xla(shape), donate_argnums=k.donate)
    args = k.args(shape)
    host = tuple(np.asarray(a) for a in args)
    out = fn(*args)
    live = list(args)                        # the arguments as a benchmarked call leaves them
    for i, o in zip(k.donate, out):
        live[i] = o
    tiny, catalogue = (cases.Case(k, shape, "xla", tiny=t) for t in (True, False))
    tiny.check(host, live, out)              # float64 reference
    catalogue.check(host, live, out)         # the on-device check a TPU run uses
    for case in (tiny, catalogue):
        for fill in (0, 7):
            with pytest.raises(AssertionError):
                case.check(host, live, _corrupt(out, fill))


def test_peer_check_against_the_xla_twin():
    """The peer's check (its q taken as pre-scaled), fed the xla twin at sm_scale=1."""
    from pallas_ops.paged.xla import paged_attention_xla

    k = cases.KERNELS["peer_jax_paged_attention"]
    shape = S.PagedAttentionShape("tiny-decode-b2-ctx80-p16", 2, 1, 80, num_q_heads=8,
                                  num_kv_heads=2)
    q, kp, vp, lengths, table = args = k.args(shape)
    b = q.shape[0]
    out = paged_attention_xla(q, kp, vp, lengths, table, jnp.arange(b + 1, dtype=jnp.int32),
                              jnp.asarray([b], jnp.int32), sm_scale=1.0)
    k.device_check(shape, args, out)
    for fill in (0, 7):
        with pytest.raises(AssertionError):
            k.device_check(shape, args, _corrupt(out, fill))


def test_roofline_figures():
    v5p = CHIPS["v5p"]
    f = harness.tpu_figures(int(v5p.hbm_bytes_per_s * 1e-3), None, 2e-3, 1e-3, "v5p")
    assert f["bound"] == "hbm"
    assert f["roofline_floor_us"] == pytest.approx(1e3)
    assert f["hbm_roofline_pct_at_min"] == pytest.approx(100)
    assert f["hbm_roofline_pct_at_mean"] == pytest.approx(50)
    assert f["gb_per_s_at_min"] == pytest.approx(2765)   # v5p: 2765 GB/s per chip (Google Cloud)
    assert "mxu_peak_pct_at_min" not in f
    # compute-bound: 1 ms of MXU work, 0.1 ms of HBM traffic
    g = harness.tpu_figures(int(v5p.hbm_bytes_per_s * 1e-4), int(v5p.bf16_flops * 1e-3),
                            1e-3, 1e-3, "v5p")
    assert g["bound"] == "mxu"
    assert g["mxu_peak_pct_at_min"] == pytest.approx(100)
    assert g["hbm_roofline_pct_at_min"] == pytest.approx(10)


@pytest.mark.parametrize("kernel", list(cases.KERNELS))
def test_catalogue_shapes_have_figures(kernel):
    """bytes (and flops where the kernel does matmul work) at every catalogue shape."""
    k = cases.KERNELS[kernel]
    for shape in k.catalogue():
        assert k.hbm_bytes(shape) > 0
        if k.flops:
            assert k.flops(shape) > 0


def test_pipelined_waits_once_per_round(monkeypatch):
    """pedantic(iterations=n) times n invocations as a round: only the n-th waits, on all n (on
    the last one when the calls are chained through donated buffers)."""
    waits = []
    monkeypatch.setattr(jax, "block_until_ready", lambda xs: waits.append(list(xs)) or xs)
    calls = iter(range(100))
    target = harness.Pipelined(lambda: next(calls), 3)
    for _ in range(7):
        target()
    assert waits == [[0, 1, 2], [3, 4, 5]] and target.pending == [6]
    assert target.round() >= 0 and waits[-2:] == [[6], [7, 8, 9]] and target.pending == []
    chained = harness.Pipelined(lambda: next(calls), 2, chained=True)
    for _ in range(5):
        chained()
    assert waits[-2:] == [[11], [13]] and chained.pending == [14]
