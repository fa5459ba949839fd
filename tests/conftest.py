"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kernels():
    """llmserve's compiled CPU kernels; tests that need them skip where they cannot be built."""
    from llmserve.kernels import cpu_kernels

    k = cpu_kernels()
    if k is None:
        pytest.skip("no C++ toolchain to build the CPU kernels")
    return k
