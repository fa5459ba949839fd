"""CPU attention backend: one kernel call per layer (csrc/paged_attention.cpp) writes the step's
K/V into the paged cache and attends for every sequence of the step, whatever its number of new
tokens (decode, verify, prefill chunk over a cached prefix), reading the cache in place."""
from __future__ import annotations

import torch

from llmserve.attention.backend import KVCaches
from llmserve.attention.metadata import AttentionBatch, AttentionLayer


class CpuPagedAttention:
    def __init__(self, kernels, kv_caches: KVCaches) -> None:
        self.kernels = kernels
        self.kv_caches = kv_caches

    def prepare(self, batch: AttentionBatch) -> None:
        self.batch = batch

    def forward(self, layer: AttentionLayer, q, k, v) -> torch.Tensor:
        b = self.batch
        k_cache, v_cache = self.kv_caches[layer.index]
        return self.kernels.paged_attention(q, k, v, k_cache, v_cache, b.slot_mapping, b.query_start_loc, b.seq_lens,
                                            b.block_tables, b.block_size, layer.scale, layer.sliding_window or 0,
                                            layer.soft_cap or 0.0)
