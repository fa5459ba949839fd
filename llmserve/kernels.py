"""llmserve's CPU kernels (csrc/): built on first use with torch's extension builder and cached
under TORCH_EXTENSIONS_DIR, so only the first start on a machine pays the compile. Callers fall
back to plain torch when no compiler is available."""
from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("bindings.cpp", "paged_decode.cpp", "weight_only_gemm.cpp", "gguf_gemm.cpp", "fused_ops.cpp")]
_module = None


def cpu_kernels():
    """The compiled module, or None if it cannot be built here (no compiler, no ninja, an error)."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp", "-fno-math-errno"] + ([] if os.environ.get("LLMSERVE_PORTABLE_KERNELS") else ["-march=native"])
        try:
            _module = load(name="llmserve_cpu_kernels", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:
            logger.warning("CPU kernels unavailable (%s); using plain torch", e.__class__.__name__)
            _module = False
    return _module or None
