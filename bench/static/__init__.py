"""Static schedule analysis of the kernels from libtpu's AOT dumps (no TPU needed).

    parse.py    reads libtpu's final VLIW schedule (loops, bundles, delay slots, VMEM)
    dump.py     compiles in a subprocess whose libtpu writes those dumps
    analysis.py MainLoop (what a bench module declares), Result, analyze / analyze_many
    cli.py      `python -m bench static`: the table

    from bench.static import analyze
    r = analyze("peer_jax_paged", "decode-b8-ctx4096-p16", chip="v5p")
"""
from bench.static.analysis import MainLoop, Result, analyze, analyze_dump, analyze_many

__all__ = ["MainLoop", "Result", "analyze", "analyze_dump", "analyze_many"]
