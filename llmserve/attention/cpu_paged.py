"""CPU attention backend whose decode reads the paged KV cache in place (csrc/paged_decode.cpp).
Prefill chunks use the torch reference path."""
from __future__ import annotations

import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.metadata import AttentionMetadata


class CpuPagedAttention(TorchAttention):
    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.kernels.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                   meta.decode_seq_lens, meta.block_size, scale)
