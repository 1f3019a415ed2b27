"""Runs tests/multi_device/ in its own process on 8 host CPU devices.

jax fixes its device count when a backend starts, so the multi-device tests cannot share this
process: this test starts `pytest tests/multi_device` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and fails with its output if any fails.
"""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_multi_device_suite():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["PALLAS_DFLASH_MULTI_DEVICE"] = "1"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(REPO / "tests" / "multi_device")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1800)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    assert proc.returncode == 0, f"multi-device suite failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout, tail
