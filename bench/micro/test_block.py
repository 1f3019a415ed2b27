"""block_attention and append_context (pallas_ops/block) at the drafter shapes."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("block_attention"))
def test_block_attention(benchmark, settings, case):
    harness.run(benchmark, case, settings)


@pytest.mark.parametrize("case", cases.params("append_context"))
def test_append_context(benchmark, settings, case):
    harness.run(benchmark, case, settings)
