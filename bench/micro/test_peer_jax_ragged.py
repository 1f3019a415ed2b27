"""jax's bundled ragged_paged_attention (bench/kernels/peer_jax_ragged.py) at the paged-attention
shapes, grouped with ours (`paged_attention <shape>`). TPU only: it has no interpreter mode."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("peer_jax_ragged_paged_attention"))
def test_peer_jax_ragged_paged_attention(benchmark, settings, case):
    harness.run(benchmark, case, settings)
