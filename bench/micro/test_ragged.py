"""ragged_paged_attention (pallas_ops/paged/ragged.py: jax's signature and interleaved cache, our
kernel) at the paged-attention shapes, grouped with paged_attention (`paged_attention <shape>`)."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("ragged_paged_attention"))
def test_ragged_paged_attention(benchmark, settings, case):
    harness.run(benchmark, case, settings)
