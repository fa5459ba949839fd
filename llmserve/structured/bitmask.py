"""The batch's grammar rows as one token bitmask, applied to the logits in one batched op.

Each grammar row's allowed tokens are one bit per vocabulary entry, packed 32 to an int32 word
(llguidance's layout). llguidance fills the rows (in parallel, in Rust, without the GIL); the
sampler unpacks them with a shift and sets the disallowed logits to -inf. Rows without a grammar
are not touched, and a batch without one does none of this.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmserve.structured.compiler import GrammarState

_executor = None


def _llg_executor():
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor()
    return _executor


def fill_bitmask(states: Sequence[GrammarState], vocab_size: int, eos_token_ids: Sequence[int]) -> np.ndarray:
    """[len(states), ceil(V / 32)] int32: bit t of row i is set when states[i] allows token t next.
    A row that allows nothing (a broken matcher) allows EOS instead, so it can end."""
    import llguidance.numpy as lln

    words = (vocab_size + 31) // 32
    mask = np.zeros((len(states), words), dtype=np.int32)
    if len(states) == 1:
        lln.fill_next_token_bitmask(states[0].matcher, mask, 0)
    else:
        lln.fill_next_token_bitmask_par(_llg_executor(), [(s.matcher, i) for i, s in enumerate(states)], mask)
    empty = ~mask.any(axis=1)
    if empty.any():
        for t in eos_token_ids:
            mask[empty, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    return mask


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf wherever bit t of bitmask[i] is clear. Columns past the
    bitmask's width (a logits row wider than the grammar's vocabulary) are disallowed too."""
    vocab = logits.shape[-1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if allowed.shape[1] < vocab:
        allowed = torch.nn.functional.pad(allowed, (0, vocab - allowed.shape[1]), value=False)
    sub = logits[rows].masked_fill_(~allowed[:, :vocab], float("-inf"))
    logits[rows] = sub
