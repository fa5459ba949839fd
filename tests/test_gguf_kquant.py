"""GGUF Q5_0, Q4_K, Q5_K and Q6_K blocks kept as weights (csrc/gguf_kquant.cpp): dequantized bit for
bit as gguf-py (ggml's reference) dequantizes them, and a layer equals a float matmul with those
weights up to summation order, at decode and prefill row counts. gguf-py cannot quantize these
formats, so the blocks are random bytes with sane fp16 scales: every byte pattern is a valid block."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmserve.errors import InvalidRequestError
from llmserve.model.gguf_quant import BLOCK_FORMATS, GgufLinear, dequantize

# format -> (weights per block, bytes per block, byte offsets of its fp16 scales)
LAYOUT = {"q5_0": (32, 22, (0,)), "q4_k": (256, 144, (0, 2)), "q5_k": (256, 176, (0, 2)), "q6_k": (256, 210, (208,))}


def random_blocks(fmt: str, n: int, k: int, seed: int) -> torch.Tensor:
    weights, nbytes, scale_at = LAYOUT[fmt]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n, k // weights, nbytes), dtype=np.uint8)
    for off in scale_at:  # finite scales of a realistic size (random bytes could be inf or NaN)
        scales = (rng.standard_normal((n, k // weights)) * 0.01).astype(np.float16)
        blocks[:, :, off:off + 2] = scales.view(np.uint8).reshape(n, k // weights, 2)
    return torch.from_numpy(blocks.reshape(n, -1))


@pytest.mark.parametrize("fmt", list(LAYOUT))
def test_dequantize_is_bitwise_ggml(kernels, fmt):
    k = 512 if LAYOUT[fmt][0] == 256 else 96
    blocks = random_blocks(fmt, 13, k, seed=3)
    want = gguf.quants.dequantize(blocks.numpy(), BLOCK_FORMATS[fmt]).astype(np.float32)
    got = kernels.gguf_dequantize(blocks, list(LAYOUT).index(fmt) + 2, k)
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(want)).reshape(13, k))
    # the portable code, which a vector build does not run otherwise
    assert torch.equal(kernels.gguf_dequantize_portable(blocks, list(LAYOUT).index(fmt) + 2, k), got)
    assert torch.equal(dequantize(blocks, fmt, k), got)


@pytest.mark.parametrize("fmt", list(LAYOUT))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 64, 300])
def test_layer_matches_float_matmul_of_dequantized(kernels, fmt, rows):
    k = {256: 768, 32: 320}[LAYOUT[fmt][0]]
    n = 37  # not a whole tile of 16 output rows
    g = torch.Generator().manual_seed(rows)
    blocks = random_blocks(fmt, n, k, seed=rows)
    bias = torch.randn(n, generator=g)
    layer = GgufLinear(blocks, fmt, k, bias, kernels)
    weight = dequantize(blocks, fmt, k)
    x = torch.randn(rows, k, generator=g)
    want = F.linear(x.double(), weight.double(), bias.double())
    got = layer(x)
    assert got.shape == (rows, n)
    # float32 sums of 768 products: errors of order 1e-7 of the largest partial sums
    torch.testing.assert_close(got.double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)


def test_bad_blocks_are_refused(kernels):
    with pytest.raises(InvalidRequestError, match="unknown GGUF block format"):
        GgufLinear(random_blocks("q6_k", 2, 256, 0), "q3_k", 256, None, kernels)
    with pytest.raises(RuntimeError, match="weight bytes do not match"):
        kernels.gguf_linear(torch.randn(2, 300), random_blocks("q4_k", 2, 256, 0), 3, torch.empty(0))
    with pytest.raises(RuntimeError, match="unknown GGUF block format"):
        kernels.gguf_linear(torch.randn(2, 256), random_blocks("q4_k", 2, 256, 0), 9, torch.empty(0))
