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
    decode_slots: torch.Tensor | None  # [num_decode, max_context] cache slots (see decode_context)
    decode_mask: torch.Tensor | None  # [num_decode, max_context] True where the slot is outside the context
    prefills: list[PrefillSeq]
    block_size: int = 16
    decode_block_tables: torch.Tensor | None = None  # [num_decode, max_blocks] int32
    decode_seq_lens: torch.Tensor | None = None  # [num_decode] int32 context lengths

    def decode_context(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(decode_slots, decode_mask), derived from the block tables on first use and kept for the
        other layers of the step: only a backend that gathers the context needs them."""
        if self.decode_slots is None:
            lens = self.decode_seq_lens.long()
            max_ctx = int(lens.max())
            offsets = torch.arange(self.block_size, device=lens.device)
            slots = self.decode_block_tables.long()[:, :, None] * self.block_size + offsets
            self.decode_slots = slots.reshape(slots.shape[0], -1)[:, :max_ctx].contiguous()
            self.decode_mask = torch.arange(max_ctx, device=lens.device)[None, :] >= lens[:, None]
        return self.decode_slots, self.decode_mask
