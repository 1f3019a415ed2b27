"""Facts about this host, and quieting libtpu where it has no TPU to talk to.

With `jax[tpu]` installed on a machine without a TPU (here libtpu is only used to AOT-compile for
TPU generations), libtpu prints start-up errors on every backend initialisation ("could not
determine TPU accelerator type", "unexpected worker hostname", a source-location trace) although
nothing is wrong. `quiet_libtpu_off_tpu()` gives it the two settings it asks for, only on a host
without TPU device files, only where they are unset, and before jax initialises a backend: the
project's command-line entry points and its tests call it first.
"""
from __future__ import annotations

import os
import pathlib


def has_tpu_device_files() -> bool:
    """True on a TPU VM (accelerator device files present), without initialising jax."""
    return any(pathlib.Path("/dev").glob("accel*")) or pathlib.Path("/dev/vfio").exists()


# What libtpu asks for when it starts, with values that describe "no TPU slice here"; and a lock
# it takes on /tmp/libtpu_lockfile that would stop a second process AOT-compiling at the same time.
OFF_TPU_ENV = {
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "GLOG_minloglevel": "3",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu_off_tpu(env=None) -> None:
    """Set `OFF_TPU_ENV` defaults in `env` (default `os.environ`) when this host has no TPU."""
    if has_tpu_device_files():
        return
    env = os.environ if env is None else env
    for key, value in OFF_TPU_ENV.items():
        env.setdefault(key, value)
