"""What attention needs to know: per step about the batch (AttentionBatch, built once by the
runner), per layer about the layer (AttentionLayer, fixed at model construction)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionLayer:
    """The facts of one attention layer that a backend needs beside q, k and v."""
    index: int  # which layer's KV cache
    scale: float
    sliding_window: int | None = None  # attend to at most this many most recent positions
    soft_cap: float | None = None  # logits soft-capping: cap * tanh(score / cap)
    group: int = 0  # the KV group whose slots and block tables the layer uses (model/specs.py)


@dataclass
class AttentionBatch:
    """One step's sequences, laid out flat: sequence b's new tokens are rows
    query_start_loc[b]:query_start_loc[b+1] of q/k/v, and after this step its context holds
    seq_lens[b] tokens, the last of them the new ones. The first num_decodes sequences have one new
    token each. Device tensors for kernels; host copies so no backend syncs the device to read them."""
    slot_mapping: torch.Tensor  # [T] int64: the cache slot of each new token's K/V
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    block_size: int
    num_decodes: int
    query_start_loc_host: np.ndarray  # [B + 1]
    seq_lens_host: np.ndarray  # [B]
    # Decode rows (indices < num_decodes) whose attention logits the backend reports per layer
    # (take_decode_logits), for the KV policies that score tokens; empty for most steps.
    scored_rows: np.ndarray | None = None
    # The KV groups after the first (model/specs.py), each its (slot_mapping, block_tables) as the
    # fields above are group 0's: a group's blocks are its own, so are its slots and tables.
    other_groups: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def group(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping, block_tables) of KV group index."""
        return (self.slot_mapping, self.block_tables) if index == 0 else self.other_groups[index - 1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)
