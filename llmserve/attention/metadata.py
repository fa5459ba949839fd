"""What one step's attention needs to know about its batch, built once per step by the runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSeq:
    """A sequence that feeds more than one token this step (a prompt chunk)."""
    query_start: int  # offset of its first new token in the flat token batch
    query_len: int
    context_len: int  # tokens it attends to after this step: cached prefix + new tokens
    context_slots: torch.Tensor | None  # [context_len] cache slots; None when nothing was cached before


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] flat cache slot of each new token's K/V
    num_decode_tokens: int  # the batch starts with this many one-token sequences
    decode_slots: torch.Tensor | None  # [num_decode, max_context] cache slots of each decode's context
    decode_mask: torch.Tensor | None  # [num_decode, max_context] True where the slot is outside the context
    prefills: list[PrefillSeq]
    block_size: int = 16
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] int32
    decode_seq_lens: torch.Tensor | None = None  # [num_decode] int32 context lengths
