"""Rotary position embedding tables, with the rope_scaling kinds found in config.json files."""
from __future__ import annotations

import math
from typing import Any

import torch

from llmserve.errors import UnsupportedArchitectureError


def _inv_freq(head_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between.
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(head_dim: int, base: float, scaling: dict[str, Any] | None, max_len: int,
                 original_max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_len, head_dim // 2], float32."""
    inv_freq = _inv_freq(head_dim, base)
    positions = torch.arange(max_len, dtype=torch.float32)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        pass
    elif kind == "linear":
        positions = positions / scaling["factor"]
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "dynamic":
        # Dynamic NTK: transformers rescales the base only once a sequence outgrows the original
        # context, so within it the tables are the unscaled ones. Beyond it we use one fixed base,
        # sized for max_len (as vLLM does), rather than a base that changes per sequence.
        if max_len > original_max_len:
            factor = scaling["factor"]
            base = base * ((factor * max_len / original_max_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
            inv_freq = _inv_freq(head_dim, base)
    else:
        raise UnsupportedArchitectureError(f"unsupported rope_scaling type {kind!r}")
    freqs = torch.outer(positions, inv_freq)
    return freqs.cos(), freqs.sin()
