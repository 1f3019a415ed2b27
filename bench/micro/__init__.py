"""Wall-clock microbenchmarks of every kernel: a pytest-benchmark suite (not part of `tests/`).

    python -m pytest bench/micro                                   # run, print the table
    python -m pytest bench/micro --benchmark-json out.json         # + every case's extra_info
    python -m pytest bench/micro --benchmark-autosave              # save to .benchmarks/
    python -m pytest bench/micro --benchmark-compare               # compare with the last save
    python -m pytest bench/micro -k "verify_accept and sampling"   # a subset

On a TPU every catalogue shape (`bench/shapes.py`) of paged_attention, write_kv_pages,
block_attention, append_context, verify_accept (greedy and sampling) and jax's bundled paged
attention (decode shapes) runs compiled; `extra_info` holds the bytes that must move, the matmul
flops, and GB/s, percent of the HBM roofline and of the bf16 MXU peak from the mean and the min
round time (`pallas_ops/chips.py` for the peaks), and which of the two binds at that shape.

Off TPU the same suite runs at tiny shapes (`bench/micro/cases.py`): the interpreted Pallas kernel
and its xla twin, `extra_info` marked `"figures": "cpu (interpreted / xla twin; not a TPU figure)"`
with bytes and flops but no roofline figures. A quick CPU run (what CI does):

    python -m pytest bench/micro -q --benchmark-min-rounds=1 --benchmark-max-time=0.05

Timing (`harness.py`): a round dispatches `--micro-calls-per-round` calls (16 on a TPU, 2
elsewhere) back to back and waits for the device once, so host dispatch overlaps device work;
pytest-benchmark reports every time per call. `--micro-calls-per-round 1` measures the blocking
latency of one call instead. Rounds follow --benchmark-min-rounds / --benchmark-max-time /
--benchmark-warmup.

Every case checks the output of its warm-up call before timing (see `cases.py`); nothing asserts
on a time.
"""
