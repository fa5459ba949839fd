"""Building blocks of the Llama family, written to match transformers' numerics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    @property
    def scale(self) -> torch.Tensor:
        """What the normalized x is multiplied by (the fused kernels take it)."""
        return self.weight

    def finalize(self) -> None:
        """After the weights are loaded (a subclass derives its scale from them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op; in float32 it is bit-identical to transformers' LlamaRMSNorm.
        return F.rms_norm(x, self.weight.shape, self.scale, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's norm: x / rms(x) * (1 + w), in float32 whatever the model dtype (transformers'
    Gemma3RMSNorm). The checkpoint holds w; 1 + w is computed once, after loading."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__(dim, eps)
        self.register_buffer("_scale", torch.ones(dim), persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    def finalize(self) -> None:
        self._scale = 1.0 + self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.weight.shape, self._scale, self.eps).to(x.dtype)


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Widen [T, D/2] cos/sin to [T, 1, D] so that rotation is x * cos + roll(x) * sin.

    transformers computes x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1);
    roll(x) = (x2, x1) with the sign folded into sin gives the same bits in four ops.
    """
    return torch.cat((cos, cos), -1)[:, None, :], torch.cat((-sin, sin), -1)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin from rotary_tables."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin
