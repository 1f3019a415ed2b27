"""Shared pytest set-up: quiet libtpu, hypothesis profiles, interpreter hygiene.

Profiles (select with PALLAS_DFLASH_PROFILE=ci|thorough; `ci` is the default): `ci` is bounded so
the whole suite stays well under 25 minutes on 2 CPU cores; `thorough` runs many more examples.
Deadlines are off: interpreted kernels are slow and their time varies with the machine's load.
"""
import os
import pathlib

# libtpu prints start-up warnings (no TPU metadata server, no worker hostnames) whenever it is
# loaded on a host without a TPU. Tell it what it would ask for, before jax is imported. Only done
# when this host has no TPU device files, so a real TPU VM keeps its own settings.
if not any(pathlib.Path("/dev").glob("accel*")) and not pathlib.Path("/dev/vfio").exists():
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GLOG_minloglevel", "3")
    # Without a TPU, libtpu is only loaded to AOT-compile; let several test processes on this
    # host do so at once instead of failing on /tmp/libtpu_lockfile (as bench/static/dump.py does).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large],
)
hypothesis.settings.register_profile(
    "thorough",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.data_too_large],
)
PROFILE = os.environ.get("PALLAS_DFLASH_PROFILE", "ci")
hypothesis.settings.load_profile(PROFILE)
if os.environ.get("PALLAS_DFLASH_NO_SHRINK"):
    # The mutation campaign (tests/mutation.py) only asks whether a test fails: the same examples
    # are generated, but a failure is not shrunk (shrinking reruns interpreted kernels for minutes).
    hypothesis.settings.register_profile(
        PROFILE + "-no-shrink", hypothesis.settings.get_profile(PROFILE),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate])
    hypothesis.settings.load_profile(PROFILE + "-no-shrink")


def pytest_report_header(config):
    return f"hypothesis profile: {PROFILE} (PALLAS_DFLASH_PROFILE)"


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
    """A kernel that raised inside the TPU interpreter leaves its state behind: clear it."""
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()
