"""The q8 kernels built a second time with their AVX-512 VNNI path over SIMDe's portable AVX-512
(llmserve/csrc/vnni_emulation.h) and their AMX tile operations in plain C++
(llmserve/csrc/amx_emulation.h), so tests check the VNNI and AMX kernels' logic on CPUs without them.

Needs SIMDe's headers (Debian's libsimde-dev, which `make install` installs where it can); the
build is cached under the kernels' JIT cache, named by a digest of its sources and flags. A path the
CPU runs for real is not tested again emulated, unless LLMSERVE_TEST_EMULATED=1 (to check the
emulation itself on such a CPU)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import ModuleType

from llmserve.kernels import CSRC, cpu_features, jit_build, jit_cache_root, sources_digest

BINDINGS = Path(__file__).with_name("csrc") / "q8_emulated.cpp"
SOURCES = [CSRC / "gguf_q8act.cpp", BINDINGS]
HEADERS = [CSRC / "kernels.h", CSRC / "vnni_emulation.h", CSRC / "amx_emulation.h"]
# AVX2 as the host's vectors (SIMDe then builds each 512-bit operation from two of them); never
# AVX-512 itself, which would make SIMDe's operations native.
FLAGS = ["-O2", "-fopenmp", "-fno-math-errno", "-mavx2", "-mfma", "-mf16c", "-DLLMSERVE_EMULATE_VNNI",
         "-DLLMSERVE_EMULATE_AMX", f"-I{CSRC}"]
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
# gguf_linear_q8's paths the emulated build runs emulated, and the CPU flag that runs each for real.
EMULATED_PATHS = {2: "avx512_vnni", 3: "amx_int8"}


def why_not_available(path: int) -> str | None:
    """None where the emulated build can run `path` and it is worth running, else the reason."""
    cpu = cpu_features()
    if EMULATED_PATHS[path] in cpu and os.environ.get("LLMSERVE_TEST_EMULATED") != "1":
        return f"this CPU runs the real path ({EMULATED_PATHS[path]})"
    if not {"avx2", "fma", "f16c"} <= cpu:
        return "the emulated build runs on AVX2 CPUs"
    if not SIMDE_HEADER.exists():
        return "SIMDe's headers are not installed (Debian: apt-get install libsimde-dev)"
    return None


def build() -> ModuleType:
    import torch

    key = hashlib.sha256(f"{sources_digest(SOURCES + HEADERS)} {' '.join(FLAGS)} {torch.__version__}".encode())
    return jit_build(jit_cache_root() / f"q8_emulated_{key.hexdigest()[:16]}", SOURCES, FLAGS)
