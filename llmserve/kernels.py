"""llmserve's CPU kernels (csrc/): built on first use with torch's extension builder and cached
under TORCH_EXTENSIONS_DIR, so only the first start on a machine pays the compile. Callers fall
back to plain torch when no compiler is available."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = sorted(_CSRC.glob("*.cpp"))  # every kernel source; bindings.cpp declares what Python sees
_module = None


def _headers_digest() -> str:
    """torch rebuilds an extension when its sources or flags change, not its headers: a digest of
    the headers among the flags makes a header edit rebuild too."""
    digest = hashlib.sha256()
    for header in sorted(_CSRC.glob("*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()[:16]


def cpu_kernels():
    """The compiled module, or None if it cannot be built here (no compiler, no ninja, an error)."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp", "-fno-math-errno", f"-DLLMSERVE_HEADERS={_headers_digest()}"]
        flags += [] if os.environ.get("LLMSERVE_PORTABLE_KERNELS") else ["-march=native"]
        try:
            _module = load(name="llmserve_cpu_kernels", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:
            logger.warning("CPU kernels unavailable (%s); using plain torch", e.__class__.__name__)
            _module = False
    return _module or None
