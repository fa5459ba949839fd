"""CPU attention backend: one kernel call per layer writes the step's K/V into the paged cache and
runs decode attention straight over it (csrc/paged_decode.cpp). Prefill chunks use the torch
reference path, after the kernel has written their K/V."""
from __future__ import annotations

import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.metadata import AttentionMetadata

_NO_TABLES = torch.empty(0, 0, dtype=torch.int32)
_NO_LENS = torch.empty(0, dtype=torch.int32)


class CpuPagedAttention(TorchAttention):
    def __init__(self, kernels) -> None:
        self.kernels = kernels

    def __call__(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = meta.num_decode_tokens
        tables = meta.decode_block_tables if nd else _NO_TABLES
        lens = meta.decode_seq_lens if nd else _NO_LENS
        decoded = self.kernels.paged_attention_decode(q, k, v, k_cache, v_cache, meta.slot_mapping, tables, lens,
                                                      meta.block_size, scale)
        if not meta.prefills:
            return decoded
        out = torch.empty_like(q)
        out[:nd] = decoded
        self._prefills(out, q, k, v, k_cache, v_cache, meta, scale)
        return out
