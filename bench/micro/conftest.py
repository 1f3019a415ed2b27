"""pytest set-up of the microbenchmark suite (`python -m pytest bench/micro`).

Runs with the repository's pytest options (`-ra --strict-markers`); no marker is used.
`tests/conftest.py` is not loaded here: the libtpu quieting (`pallas_ops.host`) and the
interpreter hygiene it does are called again. One option of its own:
`--micro-calls-per-round N` (bench/micro/harness.py).
"""
# As tests/conftest.py: off a TPU host, quiet libtpu's start-up and let several processes load it
# at once (the test suite may be running alongside), before jax starts a backend.
from pallas_ops.host import quiet_libtpu_off_tpu  # noqa: E402

quiet_libtpu_off_tpu()

import pytest  # noqa: E402


def _mode():
    from pallas_ops.chips import current_chip
    from pallas_ops.execution import on_tpu

    return on_tpu(), current_chip()


def pytest_addoption(parser):
    parser.getgroup("benchmark").addoption(
        "--micro-calls-per-round", type=int, default=None, metavar="N",
        help="bench/micro: calls dispatched back to back per timed round, one wait for the "
             "device at its end; times are per call (default 16 on a TPU, 2 elsewhere; 1 = the "
             "blocking latency of one call)")


def pytest_configure(config):
    n = config.getoption("micro_calls_per_round")
    if n is not None and n < 1:
        raise pytest.UsageError(f"--micro-calls-per-round must be >= 1, got {n}")


def _calls_per_round(config, tpu: bool) -> int:
    n = config.getoption("micro_calls_per_round")
    return (16 if tpu else 2) if n is None else n


def pytest_report_header(config):
    tpu, chip = _mode()
    n = _calls_per_round(config, tpu)
    if tpu:
        return (f"bench/micro: TPU ({chip or 'unknown generation: no roofline figures'}), "
                f"compiled kernels at the catalogue shapes; {n} calls per round, times per call")
    return ("bench/micro: no TPU: tiny shapes, interpreted kernels and xla twins "
            f"(CPU figures, not TPU figures); {n} calls per round, times per call")


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
def settings(request):
    """bench.micro.harness.Settings: TPU or not, the chip, calls per round, and the
    pytest-benchmark options that size the rounds (min rounds, max time, warm-up)."""
    from bench.micro.harness import Settings

    config = request.config
    tpu, chip = _mode()
    warmup = config.getoption("benchmark_warmup")
    return Settings(tpu=tpu, chip=chip, calls_per_round=_calls_per_round(config, tpu),
                    min_rounds=config.getoption("benchmark_min_rounds"),
                    max_time=float(config.getoption("benchmark_max_time")),
                    warmup_calls=config.getoption("benchmark_warmup_iterations") if warmup else 0)


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
    """A kernel that raised inside the TPU interpreter leaves its state behind: clear it."""
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()
