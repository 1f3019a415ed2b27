"""jax's bundled Pallas TPU paged attention (bench/kernels/peer_jax_paged.py) at the decode
shapes, grouped with ours (`paged_attention <shape>`). TPU only: it has no interpreter mode."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("peer_jax_paged_attention"))
def test_peer_jax_paged_attention(benchmark, settings, case):
    harness.run(benchmark, case, settings)
