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
