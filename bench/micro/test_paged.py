"""paged_attention and write_kv_pages (pallas_ops/paged) at the paged-attention shapes."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("paged_attention"))
def test_paged_attention(benchmark, settings, case):
    harness.run(benchmark, case, settings)


@pytest.mark.parametrize("case", cases.params("write_kv_pages"))
def test_write_kv_pages(benchmark, settings, case):
    harness.run(benchmark, case, settings)
