"""The single execution policy of `pallas_ops.execution`."""
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_ops import execution


def test_auto_is_interpreter_off_tpu():
    assert not execution.on_tpu()  # this suite runs on CPU hosts
    params = execution.resolve_interpret(None)
    assert isinstance(params, pltpu.InterpretParams)
    assert params.uninitialized_memory == "nan"
    assert params.out_of_bounds_reads == "raise"


def test_explicit_choices_pass_through():
    assert execution.resolve_interpret(False) is False
    p = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    assert execution.resolve_interpret(p) is p
    assert execution.is_interpreted(p)
    assert not execution.is_interpreted(False)


def test_generic_interpreter_is_refused():
    with pytest.raises(ValueError, match="generic interpreter"):
        execution.resolve_interpret(True)
    with pytest.raises(TypeError):
        execution.resolve_interpret("yes")


def _copy_kernel(*, read_before_wait: bool):
    """x (HBM) -> VMEM scratch by DMA -> out. With read_before_wait the scratch is read while the
    DMA into it may still be in flight: a race the interpreter must report."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    def kernel(x_hbm, o_ref, buf, sem):
        # Inputs: x_hbm [8, 128] f32 (HBM). Outputs: o_ref [8, 128] f32. Scratch: buf [8, 128]
        # f32 VMEM, sem: one DMA semaphore.
        copy = pltpu.make_async_copy(x_hbm, buf, sem)
        copy.start()
        if read_before_wait:
            o_ref[...] = buf[...]
        copy.wait()
        if not read_before_wait:
            o_ref[...] = buf[...]

    def run(x, interpret):
        return pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
            interpret=interpret, name="race_probe")(x)

    return run, jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)


@pytest.mark.parametrize("mode", ["on_wait", "eager"])
def test_race_check_reports_a_planted_race_and_only_that(mode):
    import numpy as np

    run, x = _copy_kernel(read_before_wait=False)
    np.testing.assert_array_equal(np.asarray(run(x, execution.race_check_params(mode))), x)
    assert not execution.races_found()
    run, x = _copy_kernel(read_before_wait=True)
    run(x, execution.race_check_params(mode)).block_until_ready()
    assert execution.races_found()


def test_races_found_refuses_when_no_check_ran():
    pltpu.reset_tpu_interpret_mode_state()
    with pytest.raises(RuntimeError, match="detect_races"):
        execution.races_found()
