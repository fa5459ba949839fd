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
    group: int = 0  # the KV group whose slots and block tables the layer uses (set by the runner's KVLayout)


@dataclass
class StateBatch:
    """What state-space layers need of a step (model/mamba2.py): each sequence's state slot, and
    whether the slot holds the state after its computed tokens (False: it starts from zeros).
    The conv reads each token's window from an extended buffer where every sequence's last
    kernel - 1 inputs (from its slot) come before its new tokens: rows of both, and the rows of
    each sequence's new last inputs (in slot order), precomputed once for all layers."""
    slots: torch.Tensor  # [B] int64
    has_state: torch.Tensor  # [B] float32, 1.0 or 0.0
    slots_host: np.ndarray
    has_state_host: np.ndarray
    ext_len: int
    token_rows: torch.Tensor  # [T] int64
    prefix_rows: torch.Tensor  # [B * (kernel - 1)] int64
    end_rows: torch.Tensor  # [B * (kernel - 1)] int64

    @classmethod
    def build(cls, slots: np.ndarray, starts: np.ndarray, counts: np.ndarray, kernel: int,
              device: torch.device) -> "StateBatch":
        pad, n = kernel - 1, len(counts)
        seq_ends = np.cumsum(counts)
        token_rows = np.arange(int(seq_ends[-1]) if n else 0) + np.repeat(np.arange(1, n + 1) * pad, counts)
        ext_starts = seq_ends - counts + np.arange(n) * pad  # each sequence's first prefix row
        prefix_rows = (ext_starts[:, None] + np.arange(pad)).reshape(-1)
        end_rows = ((ext_starts + pad + counts)[:, None] - pad + np.arange(pad)).reshape(-1)
        has = starts > 0

        def tensor(a: np.ndarray, dtype=torch.int64) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

        return cls(tensor(slots), tensor(has.astype(np.float32), torch.float32), slots, has,
                   int(seq_ends[-1] if n else 0) + n * pad, tensor(token_rows), tensor(prefix_rows), tensor(end_rows))


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
    state: StateBatch | None = None  # for state-space layers, where the model has them

    def group(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot_mapping, block_tables) of KV group index."""
        return (self.slot_mapping, self.block_tables) if index == 0 else self.other_groups[index - 1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)
