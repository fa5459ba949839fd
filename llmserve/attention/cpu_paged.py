"""CPU attention backend whose decode reads the paged KV cache in place (a small C++ kernel,
compiled on first use with torch's extension builder and cached). Prefill chunks use the torch
reference path. If the kernel cannot be built, the engine falls back to TorchAttention."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "paged_decode.cpp"
_kernel = None


def load_kernel():
    """Build (once per source version) and import the kernel module; None if it cannot be built."""
    global _kernel
    if _kernel is None:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-fopenmp"] + ([] if os.environ.get("LLMSERVE_PORTABLE_KERNELS") else ["-march=native"])
        try:
            _kernel = load(name="llmserve_paged_decode", sources=[str(_SOURCE)], extra_cflags=flags,
                           extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, a build error: the reference path still works
            logger.warning("CPU paged attention kernel unavailable (%s); using the torch reference", e.__class__.__name__)
            _kernel = False
    return _kernel or None


class CpuPagedAttention(TorchAttention):
    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.kernel.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, meta.block_size, scale)
