"""Weight-only quantized linear layers: weights stored as int8 (one scale per output row) or
bfloat16, activations and everything else in float32; and the choice of format for a whole model
(the GGUF block formats live in gguf_quant.py).

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
from llmserve.model.gguf_quant import GGUF_FORMATS, GgufLinear, find_lossless_format

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


def _projections(model):
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                             (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
            yield parent, name


def _make(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, kernels) -> nn.Module:
    if fmt in GGUF_FORMATS:
        return GgufLinear.from_float(weight, bias, fmt, kernels)
    return WeightOnlyLinear(weight, bias, fmt, kernels)


def quantize_model(model, fmt: str, kernels) -> None:
    """Swap every projection of every layer, and the logits head, for a quantized linear layer in
    place. The embedding table stays float32: lookups read one row per token, not the whole table."""
    for parent, name in _projections(model):
        linear = getattr(parent, name)
        setattr(parent, name, _make(linear.weight, linear.bias, fmt, kernels))
    head_weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.logits_head = _make(head_weight, None, fmt, kernels)
    model.lm_head = None  # an untied float32 head is no longer needed


def keep_published_formats(model, kernels) -> dict[str, int]:
    """quantization="auto": every projection (and the logits head) whose float32 weights a GGUF
    block format holds exactly is stored in that format; the others stay float. Nothing is
    rounded. Returns how many layers went to each format."""
    counts: dict[str, int] = {}

    def convert(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
        found = find_lossless_format(weight)
        if found is None:
            return None
        fmt, blocks = found
        counts[fmt] = counts.get(fmt, 0) + 1
        return GgufLinear(blocks, fmt, weight.shape[1], bias, kernels)

    for parent, name in _projections(model):
        linear = getattr(parent, name)
        layer = convert(linear.weight, linear.bias)
        if layer is None:
            if not counts:
                return counts  # a float model: the first projection tells, stop before paying for the rest
            continue
        setattr(parent, name, layer)
    head_weight = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    head = convert(head_weight, None)
    if head is not None:
        model.logits_head, model.lm_head = head, None
    return counts
