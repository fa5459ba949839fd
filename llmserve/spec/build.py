"""From SpeculativeConfig to a proposer (engine/setup.py calls this once the target is loaded)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmserve.spec.config import SpeculativeConfig
from llmserve.spec.proposer import Proposer


@dataclass
class TargetParts:
    """What a draft built from (or beside) the target needs to know of it."""
    folder: Path
    model: nn.Module
    runner: object  # ModelRunner: its attention backend (early exit shares the target's KV)
    dtype: torch.dtype
    device: torch.device
    kernels: object  # llmserve's CPU kernels or None
    onednn: bool
    ops: object
    max_model_len: int
    num_blocks: int
    block_size: int
    kv_dtype: torch.dtype
    backend_factory: Callable
    vocab_size: int


def build_proposer(config: SpeculativeConfig | None, target: TargetParts) -> Proposer | None:
    if config is None:
        return None
    if config.method == "ngram":
        from llmserve.spec.ngram import NgramProposer

        return NgramProposer(config, target.device.type)
    from llmserve.spec.model_draft import build_model_proposer

    return build_model_proposer(config, target)
