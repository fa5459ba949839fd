"""What each layer keeps per token in the KV cache, declared by the model (one spec per layer).

The runner allocates cache tensors from the specs and the engine sizes the block pool by them.
Layers of one spec share a KV group; sliding-window and state-space kinds come with the models
that need them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FullAttentionSpec:
    """A layer that keeps K and V of every token of the context."""
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # attends to no more than this many recent tokens

    def slot_shape(self) -> tuple[int, int]:
        return (self.num_kv_heads, self.head_dim)

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return 2 * block_size * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


LayerSpec = FullAttentionSpec


def kv_bytes_per_block(specs: list[LayerSpec], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block of block_size tokens takes across all layers."""
    return sum(spec.bytes_per_block(block_size, dtype) for spec in specs)
