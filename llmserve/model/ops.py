"""The few elementwise steps of a layer, behind one object so a device can fuse them.

TorchOps is the reference (any device, any dtype, bit-identical to transformers in float32).
CpuFusedOps does each step in one call of the CPU kernels (csrc/fused_ops.cpp) for float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from llmserve.model.layers import RMSNorm, apply_rotary


class TorchOps:
    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """residual + x, and its norm (the residual stream goes on unnormalized)."""
        residual = x + residual
        return norm(residual), residual

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        return F.silu(gate_up[:, :half]) * gate_up[:, half:]

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        return F.gelu(gate_up[:, :half], approximate="tanh") * gate_up[:, half:]

    def rotary_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int) -> None:
        """Rotate the first num_heads heads of qkv [T, heads, D] in place."""
        qkv[:, :num_heads] = apply_rotary(qkv[:, :num_heads], cos, sin)


class CpuFusedOps(TorchOps):
    def __init__(self, kernels) -> None:
        self.k = kernels

    def add_rms_norm(self, x, residual, norm):
        if residual.dtype != torch.float32:
            return super().add_rms_norm(x, residual, norm)
        return self.k.add_rms_norm_(x, residual, norm.scale, norm.eps), residual

    def silu_mul(self, gate_up):
        if gate_up.dtype != torch.float32:
            return super().silu_mul(gate_up)
        return self.k.silu_mul(gate_up)

    def rotary_(self, qkv, cos, sin, num_heads):
        if qkv.dtype != torch.float32:
            return super().rotary_(qkv, cos, sin, num_heads)
        self.k.rotary_(qkv, cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), num_heads)
