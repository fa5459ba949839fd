"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def kernels():
    """llmserve's compiled CPU kernels. Tests that need them skip where there is no compiler to
    build them, and fail where there is one and the build failed: a compile error must not turn the
    kernels' tests into skips."""
    from llmserve.kernels import cpu_kernels, cxx_compiler

    k = cpu_kernels()
    if k is None:
        if cxx_compiler() is None:
            pytest.skip("no C++ toolchain to build the CPU kernels")
        pytest.fail("the CPU kernels did not build with the compiler here (the log above says why)")
    return k


@pytest.fixture(scope="session")
def emulated_kernels():
    """The q8 kernels built with their AVX-512 VNNI path over portable AVX-512 and their AMX tile
    operations emulated (emulated_kernels.py); skips where that cannot be built."""
    import emulated_kernels as emulated

    why = emulated.why_not_available(2) and emulated.why_not_available(3)
    if why:
        pytest.skip(why)
    return emulated.build()
