"""`python -m bench <command>`: the benchmark entry points.

    python -m bench static [--chip v5p] [--kernel NAME] [--shape NAME] [--all] [--json PATH]
        static schedule analysis from libtpu's AOT dumps (no TPU needed), see bench/static/
    python -m bench wall NAME [args]
        the wall-clock benchmark of bench/kernels/NAME.py (its main(); needs a TPU)
"""
from __future__ import annotations

import importlib
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
    if cmd == "wall":
        if not rest:
            print("usage: python -m bench wall NAME [args]", file=sys.stderr)
            return 2
        mod = importlib.import_module(f"bench.kernels.{rest[0]}")
        return int(mod.main(rest[1:]) or 0)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
