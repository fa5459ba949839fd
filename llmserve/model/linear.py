"""Projections whose weight storage is chosen when the model is built.

A model builds every projection (and its logits head) as a `Projection` with the engine's
`WeightStorage`. The loader fills the float weights; `Projection.process_weights()` then hands them
to the storage, which returns the module that computes with them: float (through oneDNN on CPU
where it is faster), GGUF blocks (for "auto": the blocks a GGUF file was published with, or Q4_1/
Q8_0 where they hold the float weights exactly; forced Q4_1/Q8_0 otherwise) or weight-only int8/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmserve.model.gguf_quant import BLOCK_FORMATS, GGUF_FORMATS, GgufLinear, find_lossless_format
from llmserve.model.weight_only import WeightOnlyLinear


class FloatLinear(nn.Module):
    """y = x W^T + b in the weights' own dtype. On CPU in float32, oneDNN's matmul where it has
    it: MKL's sgemm is slow at decode row counts on the AMD CPUs measured (docs/benchmarks.md)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and x.dtype == torch.float32 and x.device.type == "cpu":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class ShardedLinear(nn.Module):
    """A fused projection whose shards a GGUF file stored in different formats (Gemma 3's Q4_K_M:
    q and k in Q5_0, v in Q8_0): one layer per shard, outputs side by side."""

    def __init__(self, parts: list[GgufLinear]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.fmt = "+".join(p.fmt for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@dataclass
class WeightStorage:
    """How a model's projections store their weights. fmt: "none" (float), "auto" (a GGUF block
    format where it holds the weights exactly, float elsewhere), or a forced "q4_1", "q8_0",
    "int8", "bf16" (lossy). counts records how many layers went to each format. activations:
    what the GGUF layers compute with, "float32" (exact) or "q8" (8-bit blocks, integer dots)."""
    fmt: str = "none"
    kernels: object = None
    onednn: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    activations: str = "float32"
    _float_model: bool = False  # "auto" met a projection no format holds: the model is float

    @property
    def block_layers(self) -> int:
        """How many layers compute with GGUF blocks (of any format, mixed shards included)."""
        return sum(n for fmt, n in self.counts.items() if fmt not in ("float", "int8", "bf16"))

    def build(self, weight: torch.Tensor, bias: torch.Tensor | None,
              blocks: list[tuple[str, torch.Tensor]] | None = None) -> nn.Module:
        """blocks: the shards of this weight as a GGUF file published them (format, [rows, bytes]),
        which "auto" computes with (they dequantize to `weight` by construction)."""
        layer = self._from_blocks(weight, bias, blocks) if self.fmt == "auto" and blocks else None
        layer = layer or self._build(weight, bias)
        fmt = getattr(layer, "fmt", "float")
        self.counts[fmt] = self.counts.get(fmt, 0) + 1
        return layer

    def _from_blocks(self, weight: torch.Tensor, bias: torch.Tensor | None,
                     blocks: list[tuple[str, torch.Tensor]]) -> nn.Module | None:
        if self.kernels is None or any(fmt not in BLOCK_FORMATS for fmt, _ in blocks):
            return None
        if sum(b.shape[0] for _, b in blocks) != weight.shape[0]:
            return None
        runs: list[tuple[str, list[torch.Tensor]]] = []  # neighbouring shards of one format go together
        for fmt, b in blocks:
            if runs and runs[-1][0] == fmt:
                runs[-1][1].append(b)
            else:
                runs.append((fmt, [b]))
        parts, start, k = [], 0, weight.shape[1]
        for fmt, group in runs:
            rows = torch.cat(group)
            part_bias = None if bias is None else bias[start:start + rows.shape[0]]
            parts.append(GgufLinear(rows, fmt, k, part_bias, self.kernels, self.activations))
            start += rows.shape[0]
        return parts[0] if len(parts) == 1 else ShardedLinear(parts)

    def _build(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if self.fmt == "auto" and not self._float_model:
            found = find_lossless_format(weight)
            if found is not None:
                return GgufLinear(found[1], found[0], weight.shape[1], bias, self.kernels, self.activations)
            # A GGUF model's projections all come in its block formats: the first that does not
            # tells a float model, so the rest are not tried (each try quantizes a row).
            self._float_model = not any(f in self.counts for f in GGUF_FORMATS)
        elif self.fmt in GGUF_FORMATS:
            return GgufLinear.from_float(weight, bias, self.fmt, self.kernels, self.activations)
        elif self.fmt in ("int8", "bf16"):
            return WeightOnlyLinear(weight, bias, self.fmt, self.kernels)
        return FloatLinear(weight, bias, self.onednn)


class Projection(nn.Module):
    """A linear layer that loads float weights, then computes through the module its storage
    builds from them. A tied projection (a logits head sharing the embedding) has no weight of its
    own: process_weights gets the shared one."""

    def __init__(self, in_features: int, out_features: int, bias: bool, storage: WeightStorage,
                 tied: bool = False) -> None:
        super().__init__()
        self.storage = storage
        self.weight = None if tied else nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.impl: nn.Module | None = None
        # Set by the loader for a converted GGUF model: [(format, blocks)] per fused shard.
        self.source_blocks: list[tuple[str, torch.Tensor]] | None = None

    def process_weights(self, tied_weight: torch.Tensor | None = None) -> None:
        """Hand the loaded weights to the storage; the float copies go unless they are shared."""
        weight = tied_weight if tied_weight is not None else self.weight
        bias = self.bias.data if self.bias is not None else None
        self.impl = self.storage.build(weight.data, bias, self.source_blocks)
        self.weight = self.bias = self.source_blocks = None
        # A plain attribute, not nn.Module's submodule lookup and call hooks: a decode step calls
        # ~120 projections, and those layers of Python cost as much as a small kernel call.
        object.__setattr__(self, "_compute", self.impl.forward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x)
