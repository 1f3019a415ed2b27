"""Benchmarks of the kernels: wall clock (the pytest-benchmark suite `bench/micro/`; TPU figures on
a TPU, CPU figures at tiny shapes elsewhere) and static schedule analysis anywhere
(`python -m bench static`)."""
