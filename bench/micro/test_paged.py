"""paged_attention and write_kv_pages (pallas_ops/paged) at the paged-attention shapes."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("paged_attention"))
def test_paged_attention(benchmark, mode, case):
    harness.run(benchmark, case, tpu=mode[0], chip=mode[1])


@pytest.mark.parametrize("case", cases.params("write_kv_pages"))
def test_write_kv_pages(benchmark, mode, case):
    harness.run(benchmark, case, tpu=mode[0], chip=mode[1])
