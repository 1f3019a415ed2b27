"""verify_accept (pallas_ops/verify), greedy and sampling shapes."""
import pytest

from bench.micro import cases, harness


@pytest.mark.parametrize("case", cases.params("verify_accept"))
def test_verify_accept(benchmark, settings, case):
    harness.run(benchmark, case, settings)
