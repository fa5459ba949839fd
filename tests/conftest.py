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


@pytest.fixture(scope="session")
def vnni_emulated_kernels():
    """The q8 kernels built with their AVX-512 VNNI path over portable AVX-512 (vnni_emulation.py);
    skips where that cannot be built or where the CPU runs the real VNNI path."""
    import vnni_emulation

    why = vnni_emulation.why_not_available()
    if why:
        pytest.skip(why)
    return vnni_emulation.build()
