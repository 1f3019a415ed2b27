"""Benchmarks of the kernels (wall clock on TPU, static schedule analysis anywhere)."""
