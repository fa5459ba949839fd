"""The q8 kernels built a second time with their AVX-512 VNNI path over SIMDe's portable AVX-512
(llmserve/csrc/vnni_emulation.h), so tests check the VNNI kernels' logic on CPUs without VNNI.

Needs SIMDe's headers (Debian's libsimde-dev, which `make install` installs where it can); the
build is cached under the kernels' JIT cache, named by a digest of its sources and flags."""
from __future__ import annotations

import hashlib
from pathlib import Path
from types import ModuleType

from llmserve.kernels import CSRC, cpu_features, jit_build, jit_cache_root, sources_digest

BINDINGS = Path(__file__).with_name("csrc") / "q8_vnni_emulated.cpp"
SOURCES = [CSRC / "gguf_q8act.cpp", BINDINGS]
HEADERS = [CSRC / "kernels.h", CSRC / "vnni_emulation.h"]
# AVX2 as the host's vectors (SIMDe then builds each 512-bit operation from two of them); never
# AVX-512 itself, which would make SIMDe's operations native.
FLAGS = ["-O2", "-fopenmp", "-fno-math-errno", "-mavx2", "-mfma", "-mf16c", "-DLLMSERVE_EMULATE_VNNI",
         f"-I{CSRC}"]
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")


def why_not_available() -> str | None:
    """None where the emulated build can be made and is worth making, else the reason."""
    cpu = cpu_features()
    if "avx512_vnni" in cpu:
        return "this CPU runs the real VNNI path"
    if not {"avx2", "fma", "f16c"} <= cpu:
        return "the emulated build runs on AVX2 CPUs"
    if not SIMDE_HEADER.exists():
        return "SIMDe's headers are not installed (Debian: apt-get install libsimde-dev)"
    return None


def build() -> ModuleType:
    import torch

    key = hashlib.sha256(f"{sources_digest(SOURCES + HEADERS)} {' '.join(FLAGS)} {torch.__version__}".encode())
    return jit_build(jit_cache_root() / f"q8_vnni_emulated_{key.hexdigest()[:16]}", SOURCES, FLAGS)
