"""What each layer keeps per token in the KV cache, declared by the model (one spec per layer),
and how layers of different kinds share the block pool (KVLayout).

Layers of one kind form KV groups: each group has its own block table per request, and all
groups draw blocks from one pool. A block id addresses the same slots in a fixed set of page
tensors, one per position in a group, so a block serves any group: its pages hold the KV of
the group's layers. A sliding-window group frees the blocks that fall out of its window, so
those layers hold window + one block per request however long it grows. With one kind every
layer is its own page tensor and there is one group, as without groups (vLLM v1's hybrid
allocator lays the cache out the same way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from llmserve.errors import UnsupportedArchitectureError


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


@dataclass(frozen=True)
class MambaStateSpec:
    """A state-space layer's per-request state: the conv's last inputs and the SSM state, the
    same size whatever the request's length (one slot per running request)."""
    conv_dim: int
    conv_len: int  # the conv kernel less one: the inputs it still needs
    num_heads: int
    head_dim: int
    state_size: int

    def shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(conv state, SSM state) of one slot."""
        return (self.conv_len, self.conv_dim), (self.num_heads, self.head_dim, self.state_size)

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return size * (self.conv_len * self.conv_dim + self.num_heads * self.head_dim * self.state_size)


@dataclass(frozen=True)
class KVLayout:
    """Layers grouped by kind over shared page tensors."""
    windows: tuple[int | None, ...]  # per group: its sliding window, None for full attention
    group_layers: tuple[tuple[int, ...], ...]  # per group: its layers, in order
    group_of_layer: tuple[int, ...]
    page_of_layer: tuple[int, ...]  # which page tensor holds a layer's KV
    page_specs: tuple[LayerSpec, ...]  # the slot shape of each page tensor

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def windowed(self) -> bool:
        return any(w is not None for w in self.windows)

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block id takes across the page tensors."""
        return sum(spec.bytes_per_block(block_size, dtype) for spec in self.page_specs)

    def blocks_per_request(self, num_tokens: int, block_size: int, chunk: int) -> int:
        """The most blocks one request of num_tokens tokens holds at once, when a step computes
        up to chunk tokens of it: a window group holds its window and the step's chunk."""
        full = -(-num_tokens // block_size)
        return sum(full if w is None else min(full, -(-(w - 1 + chunk) // block_size) + 1) for w in self.windows)

    def max_tokens(self, num_blocks: int, block_size: int, chunk: int) -> int | None:
        """The longest request num_blocks blocks hold; None when there is no such limit (every
        layer has a window, and one request's window and chunk fit)."""
        if all(w is not None for w in self.windows):
            return None if self.blocks_per_request(1 << 40, block_size, chunk) <= num_blocks else 0
        lo, hi = 0, num_blocks * block_size
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.blocks_per_request(mid, block_size, chunk) <= num_blocks else (lo, mid - 1)
        return lo


def kv_layout(specs: list[LayerSpec], by_kind: bool = True) -> KVLayout:
    """One group when all layers are of one kind; otherwise each kind's layers are cut into groups
    of the smallest kind's count, so every group fits the same page tensors. by_kind=False: one
    group that keeps every token for every layer (attention still applies the windows)."""
    if not by_kind:
        specs = [FullAttentionSpec(*spec.slot_shape()) for spec in specs]
    kinds: dict[int | None, list[int]] = {}
    for i in sorted(range(len(specs)), key=lambda i: _kind_order(specs[i].sliding_window)):
        kinds.setdefault(specs[i].sliding_window, []).append(i)
    if len(kinds) <= 1:
        window = next(iter(kinds), None)
        n = len(specs)
        return KVLayout((window,), (tuple(range(n)),), (0,) * n, tuple(range(n)), tuple(specs))
    if len({spec.slot_shape() for spec in specs}) > 1:
        raise UnsupportedArchitectureError("layers of different kinds with different KV shapes")
    size = min(len(layers) for layers in kinds.values())
    windows, groups = [], []
    for window, layers in kinds.items():
        for start in range(0, len(layers), size):
            windows.append(window)
            groups.append(tuple(layers[start:start + size]))
    group_of, page_of = [0] * len(specs), [0] * len(specs)
    for g, layers in enumerate(groups):
        for page, layer in enumerate(layers):
            group_of[layer], page_of[layer] = g, page
    return KVLayout(tuple(windows), tuple(groups), tuple(group_of), tuple(page_of),
                    (FullAttentionSpec(*specs[0].slot_shape()),) * size)


def _kind_order(window: int | None) -> tuple[int, int]:
    """Full attention first (group 0 is full where the model has such layers), then by window."""
    return (0, 0) if window is None else (1, window)

