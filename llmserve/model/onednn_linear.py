"""float32 linear layers through oneDNN rather than MKL.

On the AMD CPUs measured here MKL's sgemm is slow at the small row counts of decode
(8 rows: 47 vs 75 GFLOP/s; 1 row: 199 vs 146 us for a 3072x576 layer) and no faster at
large ones, so the CPU engine routes float32 projections through oneDNN's matmul.
"""
from __future__ import annotations

import torch
from torch import nn


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def use_onednn(model: nn.Module) -> None:
    """Make every float32 nn.Linear of the model an OneDnnLinear, in place (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = OneDnnLinear
