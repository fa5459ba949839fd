"""Linear layers that keep their weights in GGUF's block formats (Q4_1, Q8_0) and compute with
float32 activations (csrc/gguf_gemm.cpp: a streaming kernel for up to 8 rows, a widen-a-tile
register-tiled GEMM beyond, which beats float32 oneDNN at every batch size measured here).

A GGUF model is published quantized: SmolLM2's file stores every projection as Q4_1 and the
embedding table (the tied logits head) as Q8_0. Loading dequantizes it to float32, which is exact,
so re-quantizing the float32 weights with ggml's own quantizer (gguf.quants) gives back the
published bytes. `find_lossless_format` checks exactly that, tensor by tensor, so the default
`quantization="auto"` runs a GGUF model on the weights it was published with, at 5 or 8.5 bits a
weight instead of 32, without changing a single weight. `--quantization q4_1|q8_0` forces a
format on any model (then it is lossy).

`activations="q8"` (opt-in, `--activations q8`) computes these layers as llama.cpp does: x is
quantized per block of 32 values to int8 with one scale (Q8_0; with the scaled sum of the quants
too, Q8_1, for Q4_1's offset) and the block dot products are integer ones (csrc/gguf_q8act.cpp,
AVX-512 VNNI or AVX2 chosen at run time, a scalar fallback). Faster, and lossy: x is rounded.
Q5_0 layers (in Q4_K_M files, the ones whose width is no multiple of 256) take it too, and Q4_K
layers as "q4_1f": Q4_1 blocks with float32 d and m, each Q4_K sub-block of 32 with its scale and
min multiplied out at load exactly as ggml dequantizes them (the same weights, in Q4_1's kernels),
Q5_K layers likewise as "q5_1f" (5-bit quants, in the byte kernels Q5_0 runs), and Q6_K layers as
"q6_k32": its super-blocks cut into blocks of 32 that keep the two int8 scales of their sub-blocks
of 16, so a block's dot product stays one integer. Every format has a VNNI, an AVX2 and a scalar
kernel; tests run the VNNI ones over portable AVX-512 on CPUs without VNNI.
"""
from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmserve.errors import InvalidRequestError

# Formats a float weight can be quantized into here (gguf-py quantizes them as ggml does).
GGUF_FORMATS = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}
# Every format kept as blocks when a GGUF file holds it (K-quants come only from a file: there is
# no quantizer for them here).
BLOCK_FORMATS = {**GGUF_FORMATS, "q5_0": gguf.GGMLQuantizationType.Q5_0, "q4_k": gguf.GGMLQuantizationType.Q4_K,
                 "q5_k": gguf.GGMLQuantizationType.Q5_K, "q6_k": gguf.GGMLQuantizationType.Q6_K}
_KERNEL_FORMAT = {"q4_1": 0, "q8_0": 1, "q5_0": 2, "q4_k": 3, "q5_k": 4, "q6_k": 5}  # the kernels' fmt argument
Q8_ACTIVATION_FORMATS = ("q4_1", "q8_0", "q5_0", "q4_k", "q5_k", "q6_k")  # the formats 8-bit activations apply to
_Q8_KERNEL_FORMAT = {"q4_1": 0, "q8_0": 1, "q5_0": 2, "q4_1f": 3, "q6_k32": 4, "q5_1f": 5}  # gguf_linear_q8's fmt
EXACT_TILE_FORMATS = ("q4_1", "q8_0")  # held as gguf_q8_pack tiles under float32 activations too
Q4_1F_BYTES = 24  # float32 d, float32 m, 16 bytes of nibbles
Q5_1F_BYTES = 40  # float32 d, float32 m, 32 quants 0..31
Q6_K32_BYTES = 38  # float32 d, two int8 sub-block scales, 32 quants 0..63
BLOCK_WEIGHTS = 32
# gguf_linear_q8's `path` argument: -1 picks the best this CPU has (gguf_q8_paths() lists them).
Q8_PATHS = {0: "scalar", 1: "avx2", 2: "avx512-vnni", 3: "amx"}
Q8_AUTO_PATH = -1


def q8_path_name(kernels) -> str:
    """The instruction set gguf_linear_q8 runs on this CPU (for the start's log line)."""
    return Q8_PATHS[kernels.gguf_q8_paths()[-1]]


def quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """ggml's quantizer: [N, K] float -> [N, K / 32 * block bytes] uint8."""
    if fmt not in GGUF_FORMATS:
        raise InvalidRequestError(f"unknown GGUF format {fmt!r}; choose from {sorted(GGUF_FORMATS)}")
    if weight.shape[-1] % BLOCK_WEIGHTS:
        raise InvalidRequestError(f"GGUF block formats need rows of a multiple of {BLOCK_WEIGHTS} weights")
    data = gguf.quants.quantize(weight.detach().float().cpu().numpy(), GGUF_FORMATS[fmt])
    return torch.from_numpy(np.ascontiguousarray(data))


def block_format(ggml_type_name: str) -> str | None:
    """The storage name of a ggml tensor type kept as blocks ("Q4_K" -> "q4_k"), or None."""
    name = ggml_type_name.lower()
    return name if name in BLOCK_FORMATS else None


def dequantize(blocks: torch.Tensor, fmt: str, k: int) -> torch.Tensor:
    data = gguf.quants.dequantize(blocks.numpy(), BLOCK_FORMATS[fmt])
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).reshape(-1, k)


def q4_k_as_q4_1f(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K super-blocks [N, K / 256 * 144] as Q4_1F blocks [N, K / 32 * 24]: per sub-block of 32,
    d * scale and -dmin * min in float32 (ggml's get_scale_min_k4 and its dequantization), and the
    32 nibbles in Q4_1's order (byte j: weight j low, weight j + 16 high)."""
    n = blocks.shape[0]
    sb = blocks.numpy().reshape(n, -1, 144)
    qs = sb[..., 16:].reshape(n, -1, 4, 32)  # 4 chunks of 64 weights: low nibbles first, then high
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)  # sub-block j = chunk j // 2, nibble j % 2
    out = np.empty((n, q.shape[1], 8, Q4_1F_BYTES), dtype=np.uint8)
    _k_quant_scales_into(sb, out)
    out[..., 8:] = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    return torch.from_numpy(out.reshape(n, -1))


def q5_k_as_q5_1f(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K super-blocks [N, K / 256 * 176] as Q5_1F blocks [N, K / 32 * 40]: per sub-block of 32,
    d * scale and -dmin * min in float32 (as for Q4_K), then its 32 quants (0..31: a nibble and a
    fifth bit from qh) in order, as ggml's dequantizer assembles them."""
    n = blocks.shape[0]
    sb = blocks.numpy().reshape(n, -1, 176)
    qs = sb[..., 48:].reshape(n, -1, 4, 32)  # 4 chunks of 64 weights: low nibbles first, then high
    low = np.stack([qs & 0x0F, qs >> 4], axis=3)  # [n, super-block, chunk, nibble, 32]: sub-block 2 chunk + nibble
    fifth = (sb[..., None, None, 16:48] >> np.arange(8).reshape(4, 2, 1)) & 1  # bit j of qh: sub-block j
    out = np.empty((n, sb.shape[1], 8, Q5_1F_BYTES), dtype=np.uint8)
    _k_quant_scales_into(sb, out)
    out[..., 8:] = (low | (fifth << 4)).reshape(n, -1, 8, 32).astype(np.uint8)
    return torch.from_numpy(out.reshape(n, -1))


def _k_quant_scales_into(sb: np.ndarray, out: np.ndarray) -> None:
    """Q4_K's and Q5_K's d, dmin and twelve bytes of 6-bit scales and mins (ggml's get_scale_min_k4)
    as the float32 d * scale and -dmin * min of each sub-block, into bytes 0:4 and 4:8 of out's
    [N, super-blocks, 8, block bytes]."""
    d = sb[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = sb[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    sc = sb[..., 4:16].astype(np.int32)
    scale = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 0x0F) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
    out[..., 0:4] = (d[..., None] * scale.astype(np.float32)).astype(np.float32)[..., None].view(np.uint8)
    out[..., 4:8] = (-(dmin[..., None] * mins.astype(np.float32))).astype(np.float32)[..., None].view(np.uint8)


def q6_k_as_q6_k32(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K super-blocks [N, K / 256 * 210] as Q6_K32 blocks [N, K / 32 * 38], the q8 kernels' form:
    per block of 32, the super-block's d as float32, the int8 scales of its two sub-blocks of 16,
    and its 32 quants (0..63, weight = d * scale * (q - 32)) in order, as ggml's dequantizer
    assembles them from the low nibbles and the 2-bit high parts."""
    n = blocks.shape[0]
    sb = blocks.numpy().reshape(n, -1, 210)
    ql = sb[..., 0:128].reshape(n, -1, 2, 64)  # per half of 128 weights
    qh = sb[..., 128:192].reshape(n, -1, 2, 32)
    quarters = [(ql[..., 0:32] & 0x0F) | ((qh & 3) << 4), (ql[..., 32:64] & 0x0F) | (((qh >> 2) & 3) << 4),
                (ql[..., 0:32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:64] >> 4) | (((qh >> 6) & 3) << 4)]
    q = np.stack(quarters, axis=3).reshape(n, -1, 32)  # weight 128h + 32c + l: half h, quarter c
    d = sb[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float32)
    out = np.empty((n, q.shape[1], Q6_K32_BYTES), dtype=np.uint8)
    out[..., 0:4] = np.repeat(d, 8, axis=1)[..., None].view(np.uint8)
    out[..., 4:6] = sb[..., 192:208].reshape(n, -1, 2)
    out[..., 6:] = q
    return torch.from_numpy(out.reshape(n, -1))


def dequantize_q4_1f(blocks: torch.Tensor, k: int) -> torch.Tensor:
    b = blocks.numpy().reshape(blocks.shape[0], -1, Q4_1F_BYTES)
    d, m = b[..., 0:4].copy().view(np.float32), b[..., 4:8].copy().view(np.float32)
    q = np.concatenate([b[..., 8:] & 0x0F, b[..., 8:] >> 4], axis=-1).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(d * q + m, dtype=np.float32)).reshape(-1, k)


def find_lossless_format(weight: torch.Tensor, formats: tuple[str, ...] = ("q4_1", "q8_0")) -> tuple[str, torch.Tensor] | None:
    """The first format whose blocks hold `weight` exactly (and those blocks), or None. The first
    row is tried before the whole tensor, so a float model is rejected at almost no cost."""
    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.shape[1] % BLOCK_WEIGHTS:
        return None
    for fmt in formats:
        if not torch.equal(dequantize(quantize(weight[:1], fmt), fmt, weight.shape[1]), weight[:1]):
            continue
        blocks = quantize(weight, fmt)
        if torch.equal(dequantize(blocks, fmt, weight.shape[1]), weight):
            return fmt, blocks
    return None


class GgufLinear(nn.Module):
    """y = x W^T + b with W held as GGUF blocks ([N, K / block weights * block bytes] uint8, ggml's
    layout). activations: "float32" (exact) or "q8" (x quantized per block of 32, integer dot
    products; Q4_1, Q8_0, Q5_0 and the K-quants, the others stay exact). Under q8 the blocks are
    repacked once into the tiles the q8 kernels read (a Q4_1 layer's in the same bytes, Q8_0's
    1.06x, Q5_0's 1.55x, Q5_K's 1.45x, Q6_K's 1.4x), and only the tiles are kept. Exact Q4_1 and
    Q8_0 layers keep the same tiles (gguf_linear_tiles): they widen to float32 without the
    transposes GGUF's row-major blocks need, and give a row the same bits whatever its batch."""

    def __init__(self, blocks: torch.Tensor, fmt: str, in_features: int, bias: torch.Tensor | None, kernels,
                 activations: str = "float32") -> None:
        super().__init__()
        if activations not in ("float32", "q8"):
            raise InvalidRequestError(f"activations must be 'float32' or 'q8', not {activations!r}")
        if activations == "q8" and kernels is None:
            raise InvalidRequestError("8-bit activations need llmserve's compiled CPU kernels")
        if fmt not in BLOCK_FORMATS:
            raise InvalidRequestError(f"unknown GGUF block format {fmt!r}; choose from {sorted(BLOCK_FORMATS)}")
        if activations == "q8" and fmt not in Q8_ACTIVATION_FORMATS:
            activations = "float32"
        if activations == "q8" and fmt == "q4_k":  # Q4_1's kernels over Q4_K's sub-blocks (the same weights)
            blocks, fmt = q4_k_as_q4_1f(blocks), "q4_1f"
        if activations == "q8" and fmt == "q5_k":  # as Q4_K, with 5-bit quants
            blocks, fmt = q5_k_as_q5_1f(blocks), "q5_1f"
        if activations == "q8" and fmt == "q6_k":  # Q6_K cut into blocks of 32 (the same weights)
            blocks, fmt = q6_k_as_q6_k32(blocks), "q6_k32"
        self.fmt, self.in_features, self.kernels, self.activations = fmt, in_features, kernels, activations
        self.out_features = blocks.shape[0]
        exact_tiles = (activations == "float32" and fmt in EXACT_TILE_FORMATS and kernels is not None
                       and hasattr(kernels, "gguf_linear_tiles"))
        if activations == "q8" or exact_tiles:
            self.blocks = None
            self.register_buffer("tiles", kernels.gguf_q8_pack(blocks.contiguous(), _Q8_KERNEL_FORMAT[fmt]))
        else:
            self.tiles = None
            self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("bias", torch.empty(0) if bias is None else bias.detach().float().contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, kernels,
                   activations: str = "float32") -> GgufLinear:
        return cls(quantize(weight, fmt), fmt, weight.shape[1], bias, kernels, activations)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K]."""
        if self.tiles is not None:
            return self.weight_rows(torch.arange(self.out_features))
        return self._dequantize(self.blocks)

    def weight_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The float32 weights [len(rows), K] of output rows `rows` (int64), bit for bit as the GGUF
        dequantizers compute them: what a tied embedding looks tokens up in."""
        if self.tiles is not None:
            return self.kernels.gguf_q8_weight_rows(self.tiles, _Q8_KERNEL_FORMAT[self.fmt], self.out_features,
                                                    self.in_features, rows)
        return self._dequantize(self.blocks.index_select(0, rows))

    def _dequantize(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.fmt == "q4_1f":
            return dequantize_q4_1f(blocks, self.in_features)
        if self.kernels is not None:
            return self.kernels.gguf_dequantize(blocks, _KERNEL_FORMAT[self.fmt], self.in_features)
        return dequantize(blocks, self.fmt, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.kernels is not None and x2.dtype == torch.float32:
            if self.tiles is not None and self.activations == "q8":
                y = self.kernels.gguf_linear_q8(x2, self.tiles, _Q8_KERNEL_FORMAT[self.fmt], self.out_features,
                                                self.bias, Q8_AUTO_PATH)
            elif self.tiles is not None:
                y = self.kernels.gguf_linear_tiles(x2, self.tiles, _Q8_KERNEL_FORMAT[self.fmt], self.out_features,
                                                   self.bias)
            else:
                y = self.kernels.gguf_linear(x2, self.blocks, _KERNEL_FORMAT[self.fmt], self.bias)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype), self.bias.to(x2.dtype) if self.bias.numel() else None)
        return y.reshape(*shape[:-1], y.shape[-1])


class BlockEmbedding(nn.Module):
    """Token embeddings looked up from GGUF blocks: a step's rows are dequantized as they are read,
    bit for bit the float table's rows, without holding the float table (Gemma 3's 262k x 640
    would be 671 MB in float32, 178 MB as its Q8_0 blocks). `table` holds the weights: a tied
    logits head itself (its blocks, or its q8 tiles), or a layer over the embedding's own blocks."""

    def __init__(self, table: GgufLinear, dim: int) -> None:
        super().__init__()
        self.dim = dim
        object.__setattr__(self, "table", table)  # not a submodule: it may be the logits head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.weight_rows(ids.reshape(-1)).reshape(*ids.shape, self.dim)


def model_tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's tensors, each storage counted once: parameters, buffers, and the table a
    BlockEmbedding reads (not a submodule, since it may be the logits head)."""
    seen, total = set(), 0
    for m in model.modules():
        table = m.table.buffers() if isinstance(m, BlockEmbedding) else ()
        for t in (*m._parameters.values(), *m._buffers.values(), *table):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
