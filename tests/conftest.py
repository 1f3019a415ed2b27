"""Shared pytest set-up: quiet libtpu, hypothesis profiles, interpreter hygiene.

Profiles (select with PALLAS_DFLASH_PROFILE=ci|thorough; `ci` is the default): `ci` is bounded so
the whole suite stays well under 25 minutes on 2 CPU cores; `thorough` runs many more examples.
Deadlines are off: interpreted kernels are slow and their time varies with the machine's load.
"""
import os

# Before jax initialises a backend: quiet libtpu's start-up errors on a host without a TPU, and let
# several test processes AOT-compile at once (pallas_ops.host).
from pallas_ops.host import quiet_libtpu_off_tpu  # noqa: E402

quiet_libtpu_off_tpu()

import hypothesis  # noqa: E402
import pytest  # noqa: E402

# tests/multi_device/ needs 8 host devices, fixed when jax starts: tests/test_multi_device.py runs
# it in a process of its own (PALLAS_DFLASH_MULTI_DEVICE=1 there).
if not os.environ.get("PALLAS_DFLASH_MULTI_DEVICE"):
    collect_ignore = ["multi_device"]

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


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches():
    """Free each module's compiled programs when it ends: one process runs the whole suite, and
    the interpreted kernels compile to large CPU programs (a full run once segfaulted in XLA's
    CPU compiler late in the suite, never when the module ran alone)."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(autouse=True)
def _reset_tpu_interpreter():
    """A kernel that raised inside the TPU interpreter leaves its state behind: clear it."""
    yield
    from jax.experimental.pallas import tpu as pltpu

    pltpu.reset_tpu_interpret_mode_state()
