"""The TPU AOT compile harness itself, proven on minimal kernels defined here.

If these pass, a kernel test that compiles through `aot_compile` has really been through libtpu's
Mosaic compiler for that generation; the overflow case shows that the harness can fail.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_ops import aot
from pallas_ops.chips import CHIPS
from pallas_ops.execution import resolve_interpret
from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile, require_libtpu


def _scale_kernel(x_ref, o_ref):
    # x_ref, o_ref: [bm, 128] VMEM tiles
    o_ref[...] = x_ref[...] * 2.0 + 1.0


def scale(x, *, bm=8, interpret=None):
    m, n = x.shape
    return pl.pallas_call(
        _scale_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(m // bm,),
        in_specs=[pl.BlockSpec((bm, n), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((bm, n), lambda i: (i, 0)),
        name="harness_scale",
        interpret=resolve_interpret(interpret),
    )(x)


def _scratch_hog_kernel(x_ref, o_ref, big_ref):
    # big_ref: [rows, 1024] f32 VMEM scratch, sized to exceed every generation's VMEM
    big_ref[0:8, 0:128] = x_ref[...]
    o_ref[...] = big_ref[0:8, 0:128]


def scratch_hog(x, *, rows):
    return pl.pallas_call(
        _scratch_hog_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_shapes=[pltpu.VMEM((rows, 1024), jnp.float32)],
        name="harness_scratch_hog",
    )(x)


def test_minimal_kernel_interpreted_matches_numpy():
    x = np.arange(32 * 128, dtype=np.float32).reshape(32, 128)
    np.testing.assert_array_equal(np.asarray(scale(jnp.asarray(x))), x * 2 + 1)


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_minimal_kernel_compiles_for_each_generation(chip):
    compiled = aot_compile(lambda x: scale(x, interpret=False),
                           jax.ShapeDtypeStruct((64, 128), jnp.float32), chip=chip)
    text = compiled.as_text()
    assert "harness_scale" in text  # the Mosaic custom call is in the compiled module
    assert aot.tpu_device(chip).platform == "tpu"


@pytest.mark.tpu_compile
@pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
def test_vmem_overflow_fails_to_compile(chip):
    require_libtpu()
    rows = 2 * CHIPS[chip].vmem_bytes // (1024 * 4)  # twice the chip's VMEM in one scratch buffer
    spec = jax.ShapeDtypeStruct((8, 128), jnp.float32)
    with pytest.raises(Exception, match=r"(?i)vmem|memory|exceed|resource"):
        aot_compile(lambda x: scratch_hog(x, rows=rows), spec, chip=chip)
    # ... while the same kernel with a small scratch buffer compiles: the failure is the size.
    aot_compile(lambda x: scratch_hog(x, rows=64), spec, chip=chip)


def test_unknown_chip_is_refused():
    require_libtpu()
    with pytest.raises(ValueError, match="unknown chip"):
        aot.tpu_device("v99")
