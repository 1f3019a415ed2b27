"""The suite's cases: per kernel, which shapes and implementations run, how each call is built,
how many bytes and flops it must move and do, and how its output is checked.

On a TPU: every catalogue shape (`bench/shapes.py`) of each kernel, the compiled Pallas kernel
("pallas"; plus jax's bundled paged attention, "jax-peer", at the decode shapes, and jax's
ragged paged attention beside our drop-in `ragged_paged_attention` at every paged shape). Off TPU: the
tiny shapes below, the Pallas kernel in the TPU interpreter ("pallas-interpret") and its
plain-jnp twin ("xla"), so the harness runs everywhere while its figures stay CPU figures.

Checks (before anything is timed, on the output of the warm-up call): at tiny shapes against the
float64 reference (`reference/<pkg>.py`); at catalogue shapes against the kernel's xla twin on the
same device (attention, verify) or by reading every written row back (write_kv_pages,
append_context): a float64 host reference at 16k-context shapes would take minutes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from bench import shapes as S
from bench.kernels import block as block_mod
from bench.kernels import paged as paged_mod
from bench.kernels import peer_jax_paged as peer_mod
from bench.kernels import peer_jax_ragged as peer_ragged_mod
from bench.kernels import ragged as ragged_mod
from bench.kernels import verify as verify_mod

FIGURES_TPU = "tpu"
FIGURES_CPU = "cpu (interpreted / xla twin; not a TPU figure)"

# Tiny shapes: the catalogue's geometry (D=128, bf16, GQA, pages of 16 and 64, decode / verify /
# mixed, drafter blocks of 16 and 10, greedy and sampling) at sizes an interpreted call runs in
# well under a second on a CPU core.
_H = dict(num_q_heads=8, num_kv_heads=2)
PAGED_TINY = [
    S.PagedAttentionShape("tiny-decode-b2-ctx80-p16", 2, 1, 80, **_H),
    S.PagedAttentionShape("tiny-decode-b2-ctx160-p64", 2, 1, 160, page_size=64, **_H),
    S.PagedAttentionShape("tiny-verify4-b2-ctx80-p16", 2, 4, 80, **_H),
    # 4 decoding, 3 verifying 16 tokens, 1 prefill chunk of 32 (bench.kernels.paged.layout)
    S.PagedAttentionShape("tiny-mixed-b8-ctx48-p16", 8, 32, 48, mixed=True, **_H),
]
BLOCK_TINY = [
    S.BlockAttentionShape("tiny-drafter-b2-bs16-ctx40", 2, 16, 40, 64, **_H),
    S.BlockAttentionShape("tiny-drafter-b1-bs10-ctx200", 1, 10, 200, 256, **_H),
]
VERIFY_TINY = [
    S.VerifyAcceptShape("tiny-b2-bs16-v1000-greedy", 2, 16, 1000),
    S.VerifyAcceptShape("tiny-b2-bs16-v1000-sampling", 2, 16, 1000, sampling=True),
    S.VerifyAcceptShape("tiny-b1-bs10-v640-greedy", 1, 10, 640),
    S.VerifyAcceptShape("tiny-b1-bs10-v640-sampling", 1, 10, 640, sampling=True),
]

# Attention outputs against the float64 reference / the xla twin: the tests' bf16 tolerances per
# element, and a relative error over the whole output (at 16k keys the outputs are ~1e-2, below
# the element tolerance: the norm is what catches a zero or garbage output there).
ATTN_TOL = dict(rtol=3e-2, atol=3e-2)
ATTN_REL_NORM = 2e-2


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


def assert_attention_close(got, want) -> None:
    got, want = _f32(got).astype(np.float64), np.asarray(want, np.float64)
    np.testing.assert_allclose(got, want, **ATTN_TOL)
    rel = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)
    assert rel <= ATTN_REL_NORM, f"relative error {rel:.3g} > {ATTN_REL_NORM}"


# --- paged_attention ------------------------------------------------------------------------


def _paged_xla(shape):
    from pallas_ops.paged.xla import paged_attention_xla

    return paged_attention_xla


def _paged_reference(shape, host):
    from reference import paged

    return paged.paged_attention(*host)


def _paged_compare(out, expected):
    assert_attention_close(out, expected)


def _scale_kw(args, n):
    """8-bit shapes pass (k_scales, v_scales) after the n plain arguments."""
    return dict(k_scales=args[n], v_scales=args[n + 1]) if len(args) == n + 2 else {}


def _quantized_rows(shape, new):
    """New rows as an 8-bit cache stores them (values, scales), or (new, None)."""
    if not getattr(shape, "cache_dtype", None):
        return new, None
    import jax.numpy as jnp

    from pallas_ops.quant import quantize
    return quantize(new, jnp.dtype(shape.cache_dtype),
                    scale_dtype=jnp.dtype(getattr(shape, "scale_dtype", "float32")))


def _paged_device_check(shape, args, out):
    import jax

    fn = jax.jit(lambda *a: _paged_xla(shape)(*a[:7], **_scale_kw(a, 7)))
    assert_attention_close(out, fn(*args))


# --- ragged_paged_attention (jax's signature and interleaved cache) -----------------------------


def _ragged_xla(shape):
    """The xla twin on the de-interleaved cache (a copy: fine for a twin), bench's sm_scale."""
    import jax.numpy as jnp

    from pallas_ops.paged.xla import paged_attention_xla

    def twin(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
        k, v = (jnp.transpose(kv_pages[:, :, i::2], (2, 0, 1, 3)) for i in (0, 1))
        return paged_attention_xla(q, k, v, kv_lens, page_indices, cu_q_lens, num_seqs,
                                   sm_scale=shape.head_dim ** -0.5)

    return twin


def _ragged_reference(shape, host):
    from reference import paged

    return paged.ragged_paged_attention(*host, sm_scale=shape.head_dim ** -0.5)


def _ragged_device_check(shape, args, out):
    import jax

    assert_attention_close(out, jax.jit(_ragged_xla(shape))(*args))


# --- write_kv_pages --------------------------------------------------------------------------


def _write_xla(shape):
    from pallas_ops.paged.xla import write_kv_pages_xla

    return write_kv_pages_xla


def _write_reference(shape, host):
    from reference import paged

    return paged.write_kv_pages(*host)


def _exact(out, expected):
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(_f32(got), _f32(want))


def _write_device_check(shape, args, out):
    """Every new row read back from its page (exact)."""
    import jax.numpy as jnp

    _, _, k_new, v_new, kv_lens, table, cu, _ = args[:8]
    q_lens, kv = paged_mod.layout(shape)
    table = np.asarray(table)
    pages, rows = [], []
    for s, (q, n) in enumerate(zip(q_lens, kv)):
        for pos in range(n - q, n):
            pages.append(table[s, pos // shape.page_size])
            rows.append(pos % shape.page_size)
    pages, rows = jnp.asarray(pages), jnp.asarray(rows)
    for i, new in enumerate((k_new, v_new)):
        values, scales = _quantized_rows(shape, new)
        got = jnp.swapaxes(out[i][:, pages, rows], 0, 1)             # [T, Hkv, D]
        np.testing.assert_array_equal(_f32(got), _f32(values))
        if scales is not None:                                       # 8-bit: out[2:] are scales
            np.testing.assert_array_equal(_f32(out[2 + i][:, pages, rows].T), _f32(scales))


# --- block_attention -------------------------------------------------------------------------


def _block_xla(shape):
    from pallas_ops.block.xla import block_attention

    return block_attention


def _block_reference(shape, host):
    from reference import block

    return block.block_attention(*host)


def _block_device_check(shape, args, out):
    """Against the xla twin on the first sequence (the twin materialises f32 copies of the
    whole cache: a 32k-context batch of 32 would not fit a v5e)."""
    import jax

    first = tuple(a[:1] for a in args)
    fn = jax.jit(lambda *a: _block_xla(shape)(*a[:6], **_scale_kw(a, 6)))
    assert_attention_close(out[:1], fn(*first))


# --- append_context --------------------------------------------------------------------------


def _append_xla(shape):
    from pallas_ops.block.xla import append_context

    return append_context


def _append_reference(shape, host):
    from reference import block

    return block.append_context(*host)


def _append_device_check(shape, args, out):
    """Every sequence's new rows read back from the cache (exact)."""
    import jax.numpy as jnp

    c, n = block_mod.append_offset(shape), shape.block_size
    for i, new in enumerate(args[2:4]):
        values, scales = _quantized_rows(shape, new)                 # [B, n, Hkv, D]
        np.testing.assert_array_equal(_f32(out[i][:, :, c:c + n]),
                                      _f32(jnp.swapaxes(values, 1, 2)))
        if scales is not None:
            np.testing.assert_array_equal(_f32(out[2 + i][:, :, c:c + n]),
                                          _f32(jnp.swapaxes(scales, 1, 2)))


# --- verify_accept ---------------------------------------------------------------------------


def _verify_call(impl_fn, shape):
    if not shape.sampling:
        return impl_fn

    def sampled(logits, drafts, temperature, seed, position):
        return impl_fn(logits, drafts, temperature=temperature, seed=seed, position=position)

    return sampled


def _verify_xla(shape):
    from pallas_ops.verify.xla import verify_accept

    return _verify_call(verify_accept, shape)


def _verify_reference(shape, host):
    from reference import verify

    return tuple(_verify_call(verify.verify_accept, shape)(*host))


def _verify_compare(out, expected):
    for got, want in zip(out, expected):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _verify_device_check(shape, args, out):
    import jax

    _verify_compare(out, jax.jit(_verify_xla(shape))(*args))


# --- jax's bundled paged attention (TPU only) -------------------------------------------------


def _peer_device_check(shape, args, out):
    """Against our xla twin with sm_scale=1 (the peer takes q pre-scaled)."""
    import jax
    import jax.numpy as jnp

    from pallas_ops.paged.xla import paged_attention_xla

    q, k, v, lengths, table = args
    b = q.shape[0]
    cu = jnp.arange(b + 1, dtype=jnp.int32)
    want = jax.jit(functools.partial(paged_attention_xla, sm_scale=1.0))(
        q, k, v, lengths, table, cu, jnp.asarray([b], jnp.int32))
    assert_attention_close(out, want)


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One benchmarked function and everything the harness needs to run and check it."""
    name: str
    catalogue: Callable[[], list]          # shapes on a TPU
    tiny: list                             # shapes off TPU
    build: Callable                        # build(shape, *, chip, interpret) -> (fn, specs)
    args: Callable                         # concrete_args(shape) -> tuple of arrays
    hbm_bytes: Callable
    flops: Callable | None                 # matmul flops, None: no MXU work worth a figure
    xla: Callable | None                   # xla(shape) -> the plain-jnp twin's fn (same args)
    reference: Callable | None             # reference(shape, host args) -> float64 expectation
    compare: Callable | None               # compare(out, expected), raises on mismatch
    device_check: Callable                 # device_check(shape, args, out) at catalogue shapes
    donate: tuple = ()                     # arguments updated in place (fed back every call)
    cpu: bool = True                       # has an interpreter mode / an off-TPU variant
    group_as: str | None = None            # benchmark group prefix (default: name)


KERNELS: dict[str, Kernel] = {k.name: k for k in [
    Kernel("paged_attention", paged_mod.shapes, PAGED_TINY, paged_mod.build,
           paged_mod.concrete_args, paged_mod.hbm_bytes, paged_mod.flops, _paged_xla,
           _paged_reference, _paged_compare, _paged_device_check),
    Kernel("ragged_paged_attention", ragged_mod.shapes, PAGED_TINY, ragged_mod.build,
           ragged_mod.concrete_args, ragged_mod.hbm_bytes, ragged_mod.flops, _ragged_xla,
           _ragged_reference, _paged_compare, _ragged_device_check, group_as="paged_attention"),
    Kernel("write_kv_pages", paged_mod.shapes, PAGED_TINY, paged_mod.write_build,
           paged_mod.write_concrete_args, paged_mod.write_hbm_bytes, None, _write_xla,
           _write_reference, _exact, _write_device_check, donate=(0, 1)),
    Kernel("block_attention", block_mod.shapes, BLOCK_TINY, block_mod.build,
           block_mod.concrete_args, block_mod.hbm_bytes, block_mod.flops, _block_xla,
           _block_reference, _paged_compare, _block_device_check),
    Kernel("append_context", block_mod.shapes, BLOCK_TINY, block_mod.append_build,
           block_mod.append_concrete_args, block_mod.append_hbm_bytes, None, _append_xla,
           _append_reference, _exact, _append_device_check, donate=(0, 1)),
    Kernel("verify_accept", verify_mod.shapes, VERIFY_TINY, verify_mod.build,
           verify_mod.concrete_args, verify_mod.hbm_bytes, None, _verify_xla,
           _verify_reference, _verify_compare, _verify_device_check),
    Kernel("peer_jax_paged_attention", peer_mod.shapes, [], peer_mod.build,
           peer_mod.concrete_args, peer_mod.hbm_bytes, paged_mod.flops, None, None, None,
           _peer_device_check, cpu=False, group_as="paged_attention"),
    Kernel("peer_jax_ragged_paged_attention", peer_ragged_mod.shapes, [], peer_ragged_mod.build,
           peer_ragged_mod.concrete_args, peer_ragged_mod.hbm_bytes, paged_mod.flops, None, None,
           None, _ragged_device_check, cpu=False, group_as="paged_attention"),
]}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: Kernel
    shape: Any
    impl: str          # "pallas" (compiled), "pallas-interpret", "xla", "jax-peer"
    tiny: bool         # off-TPU shape: checked against the float64 reference

    @property
    def id(self) -> str:
        return f"{self.shape.name}-{self.impl}"

    @property
    def group(self) -> str:
        return f"{self.kernel.group_as or self.kernel.name} {self.shape.name}"

    def function(self, chip):
        """The (unjitted) function of this case and its concrete arguments."""
        k = self.kernel
        if self.impl == "xla":
            fn = k.xla(self.shape)
        elif self.impl == "pallas-interpret":
            fn, _ = k.build(self.shape, chip=chip, interpret=None)
        elif self.impl == "jax-peer":
            fn, _ = k.build(self.shape, chip=chip)
        else:
            fn, _ = k.build(self.shape, chip=chip, interpret=False)
        return fn, k.args(self.shape)

    @property
    def checked_against(self) -> str:
        if self.tiny:
            return "float64 reference"
        return {"write_kv_pages": "new rows read back", "append_context": "new rows read back",
                "block_attention": "xla twin on the device (first sequence)"}.get(
                    self.kernel.name, "xla twin on the device")

    def check(self, args_host, args, out) -> None:
        """Raises if `out` (the warm-up call's result) is wrong; see the module docstring."""
        k = self.kernel
        if self.tiny:
            k.compare(out, k.reference(self.shape, args_host))
        else:
            k.device_check(self.shape, args, out)


def cases(kernel: str, *, tpu: bool) -> list[Case]:
    k = KERNELS[kernel]
    if tpu:
        impl = "jax-peer" if kernel.startswith("peer_") else "pallas"
        return [Case(k, s, impl, tiny=False) for s in k.catalogue()]
    if not k.cpu:
        return []
    return [Case(k, s, impl, tiny=True) for s in k.tiny for impl in ("pallas-interpret", "xla")]


def params(kernel: str) -> list:
    """pytest parameters of `kernel`'s cases on this host (one skipped entry when there are
    none: jax's peer kernel off TPU)."""
    import pytest

    from pallas_ops.execution import on_tpu

    found = cases(kernel, tpu=on_tpu())
    if not found:
        return [pytest.param(None, id="tpu-only", marks=pytest.mark.skip(
            reason=f"{kernel}: TPU only (no interpreter mode)"))]
    return [pytest.param(c, id=c.id) for c in found]
