"""Benchmarks of the kernels: wall clock (the pytest-benchmark suite `bench/micro/`; TPU figures on
a TPU, CPU figures at tiny shapes elsewhere) and static schedule analysis anywhere
(`python -m bench static`); `bench.collectives` reads the collectives and per-device memory of a
sharded program AOT-compiled for a TPU slice (`pallas_ops.aot.compile_sharded`)."""
