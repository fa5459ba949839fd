"""Weight-only quantized linear layers: weights stored as int8 (one scale per output row) or
bfloat16, activations and everything else in float32 (the GGUF block formats live in
gguf_quant.py; linear.py chooses a model's storage).

Decode is bound by reading weights, so storing them in fewer bytes is the lever on a CPU: the
small-batch kernel (csrc/weight_only_gemm.cpp) widens them in registers as it streams them. Large
batches (long prefill chunks) are bound by compute instead; they widen the weight to float32 once
per call and use the regular GEMM. int8 is lossy (see benchmarks/quant_drift.py); bf16 rounds each weight to 8
mantissa bits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.errors import InvalidRequestError

WEIGHT_FORMATS = ("int8", "bf16")
# Rows up to which the streaming kernel beats widening the weight and calling the GEMM: measured on
# AVX2 at 3072x576, the kernel is within 10-30% of a float32 GEMM up to 128 rows while widening
# alone costs more than that; past a few hundred rows (prefill chunks) the GEMM pulls ahead.
STREAMING_MAX_ROWS = 256


class WeightOnlyLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, kernels) -> None:
        super().__init__()
        if fmt not in WEIGHT_FORMATS:
            raise InvalidRequestError(f"unknown weight format {fmt!r}; choose from {WEIGHT_FORMATS}")
        self.fmt = fmt
        weight = weight.detach().float()
        if fmt == "int8":
            scale = (weight.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8).contiguous())
            self.register_buffer("scale", scale.contiguous())
        else:
            self.register_buffer("weight", weight.to(torch.bfloat16).contiguous())
            self.register_buffer("scale", torch.empty(0))
        self.register_buffer("bias", torch.empty(0) if bias is None else bias.detach().float().contiguous())
        self.kernels = kernels

    def dequantized(self) -> torch.Tensor:
        w = self.weight.float()
        return w * self.scale[:, None] if self.scale.numel() else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernels is not None and x2.shape[0] <= STREAMING_MAX_ROWS and x2.dtype == torch.float32:
            y = self.kernels.weight_only_linear(x2, self.weight, self.scale, self.bias)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), self.bias.to(x2.dtype) if self.bias.numel() else None)
        return y.reshape(*shape[:-1], y.shape[-1])
