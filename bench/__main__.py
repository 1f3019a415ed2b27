"""`python -m bench <command>`: the benchmark entry points.

    python -m bench static [--chip v5p] [--kernel NAME] [--shape NAME] [--all] [--json PATH]
        static schedule analysis from libtpu's AOT dumps (no TPU needed), see bench/static/

    python -m bench sharded [--case NAME] [--all] [--json PATH]
        the tensor/data-parallel decode steps AOT-compiled for TPU slices: collectives, memory,
        weights per chip (bench/sharded.py)

The wall-clock benchmarks are a pytest-benchmark suite, not a command of this module:

    python -m pytest bench/micro                      # on a TPU: every catalogue shape, compiled
    python -m pytest bench/micro --benchmark-json out.json --benchmark-autosave
    python -m pytest bench/micro --benchmark-compare  # against the last autosaved run

Off TPU the same suite runs at tiny shapes (interpreted kernels and xla twins), its figures
marked as CPU figures; see bench/micro/__init__.py.
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from pallas_ops.host import quiet_libtpu_off_tpu

    quiet_libtpu_off_tpu()   # before jax starts a backend: no libtpu start-up errors off TPU
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "static":
        from bench.static import cli

        return cli.main(rest)
    if cmd == "sharded":
        from bench import sharded

        return sharded.main(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
