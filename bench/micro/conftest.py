"""pytest set-up of the microbenchmark suite (`python -m pytest bench/micro`).

Runs with the repository's pytest options (`-ra --strict-markers`); the only marker used,
`benchmark`, is pytest-benchmark's own. `tests/conftest.py` is not loaded here, so the libtpu
quieting and the interpreter hygiene it does are repeated.
"""
import os
import pathlib

# As tests/conftest.py: off a TPU host, tell libtpu what it would ask for before jax is imported,
# and let several processes load it at once (the test suite may be running alongside).
if not any(pathlib.Path("/dev").glob("accel*")) and not pathlib.Path("/dev/vfio").exists():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


def _mode():
    from pallas_ops.chips import current_chip
    from pallas_ops.execution import on_tpu

    return on_tpu(), current_chip()


def pytest_report_header(config):
    tpu, chip = _mode()
    if tpu:
        return (f"bench/micro: TPU ({chip or 'unknown generation: no roofline figures'}), "
                "compiled kernels at the catalogue shapes")
    return ("bench/micro: no TPU: tiny shapes, interpreted kernels and xla twins "
            "(CPU figures, not TPU figures)")


def pytest_benchmark_update_machine_info(config, machine_info):
    """Which device the figures are from, in the saved JSON's machine_info."""
    import jax

    tpu, chip = _mode()
    machine_info["pallas_dflash"] = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "chip": chip,
        "figures": "tpu" if tpu else "cpu (interpreted / xla twin; not a TPU figure)",
    }


@pytest.fixture(scope="session")
def mode():
    """(on_tpu, chip): chip is the TPU generation (`pallas_ops.chips`), None off TPU."""
    return _mode()


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
    """A kernel that raised inside the TPU interpreter leaves its state behind: clear it."""
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()
