"""Test-side wrapper of `pallas_ops.aot`: skip without libtpu, except under CI=true (fail).

Usage in a test module:

    from tests.tpu_harness import CHIPS_UNDER_TEST, aot_compile
    @pytest.mark.tpu_compile
    @pytest.mark.parametrize("chip", CHIPS_UNDER_TEST)
    def test_compiles(chip):
        aot_compile(fn, jax.ShapeDtypeStruct(...), chip=chip)
"""
from __future__ import annotations

import os

import pytest

from pallas_ops import aot

CHIPS_UNDER_TEST = ("v5e", "v5p", "v6e")


def require_libtpu():
    """Skip (or, under CI=true, fail) when libtpu is missing."""
    if aot.libtpu_available():
        return
    reason = "libtpu is not installed (pip install -e '.[tpu]'): TPU AOT compile not checked"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("CI=true requires the TPU compile checks to run: " + reason)
    pytest.skip(reason)


def aot_compile(fn, *args, chip: str, **kwargs):
    """AOT-compile `fn` for `chip` (see `pallas_ops.aot.compile_for_tpu`)."""
    require_libtpu()
    return aot.compile_for_tpu(fn, *args, chip=chip, **kwargs)
