"""8-bit activations for the GGUF block formats (--activations q8): the kernels quantize x per block
of 32 exactly as a numpy reference does and compute the integer block dot products llama.cpp
computes (Q4_1 x Q8_1, Q8_0 x Q8_0), equal to that reference up to summation order on every
instruction-set path this CPU has; the engine runs a published Q4_1 model close to float
activations; and the flag refuses to start where it would change nothing."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llmserve.cli import build_parser, engine_kwargs
from llmserve.config import EngineConfig
from llmserve.errors import InvalidRequestError
from llmserve.model.gguf_quant import Q8_PATHS, GgufLinear, dequantize, quantize
from llmserve.sampling_params import SamplingParams
from tiny_models import (llama_config, make_llm, make_model_folder, make_published_gguf_model, random_prompts,
                         tokens_before_first_difference)

FORMATS = ["q4_1", "q8_0", "q5_0", "q4_1f", "q6_k32", "q5_1f"]
FMT_ARG = {"q4_1": 0, "q8_0": 1, "q5_0": 2, "q4_1f": 3, "q6_k32": 4, "q5_1f": 5}
BYTES = {"q4_1": 20, "q8_0": 34, "q5_0": 22, "q4_1f": 24, "q6_k32": 38, "q5_1f": 40}


def blocks_of(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """ggml's quantizer (Q5_0 too, which llmserve only reads from files); Q4_1F (Q4_K's form for
    the q8 kernels) as Q4_1 blocks with their scales widened to float32; Q6_K32 (Q6_K's form for
    them: a float32 d, an int8 scale per half of 32, quants 0..63 around 32) fitted to the weight,
    every other block's scales negative (Q6_K's scales are signed); Q5_1F (Q5_K's form: float32 d and
    m, quants 0..31) fitted to the weight, d an fp16 value as Q5_K's d * scale always is (so q * d
    is exact)."""
    if fmt == "q5_1f":
        n = weight.shape[0]
        w = weight.numpy().reshape(n, -1, 32)
        lo, hi = w.min(-1), w.max(-1)
        d = ((hi - lo) / 31 + 1e-6).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((w - lo[..., None]) / d[..., None]), 0, 31)
        out = np.empty(d.shape + (40,), dtype=np.uint8)
        out[..., 0:4] = d[..., None].view(np.uint8)
        out[..., 4:8] = lo.astype(np.float32)[..., None].view(np.uint8)
        out[..., 8:] = q.astype(np.uint8)
        return torch.from_numpy(out.reshape(n, -1))
    if fmt == "q6_k32":
        n = weight.shape[0]
        w = weight.numpy().reshape(n, -1, 2, 16)
        amax = np.abs(w).max(-1) + 1e-6  # [n, nb, 2]
        d = (amax.max(-1) / (31 * 127)).astype(np.float16).astype(np.float32)
        sign = np.where(np.arange(d.shape[1]) % 2, -1.0, 1.0)[None, :, None]
        sc = np.clip(np.rint(amax / (31 * d[..., None])), 1, 127) * sign
        q = np.clip(np.rint(w / (d[..., None, None] * sc[..., None])) + 32, 0, 63)
        out = np.empty(d.shape + (38,), dtype=np.uint8)
        out[..., 0:4] = d[..., None].view(np.uint8)
        out[..., 4:6] = sc.astype(np.int8).view(np.uint8)
        out[..., 6:] = q.reshape(n, -1, 32).astype(np.uint8)
        return torch.from_numpy(out.reshape(n, -1))
    if fmt == "q4_1f":
        b = quantize(weight, "q4_1").numpy().reshape(weight.shape[0], -1, 20)
        out = np.empty(b.shape[:2] + (24,), dtype=np.uint8)
        out[..., 0:4] = b[..., 0:2].copy().view(np.float16).astype(np.float32).view(np.uint8)
        out[..., 4:8] = b[..., 2:4].copy().view(np.float16).astype(np.float32).view(np.uint8)
        out[..., 8:] = b[..., 4:]
        return torch.from_numpy(out.reshape(weight.shape[0], -1))
    if fmt != "q5_0":
        return quantize(weight, fmt)
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q5_0)))


# ---- the numpy reference ----

def quantize_x_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_0 for activations, in float32 as the kernels compute it: d = max|x| / 127, q = x * (1 / d)
    rounded half to even, s = d * sum(q) (Q8_1's sum, for Q4_1's offset term)."""
    m, k = x.shape
    xb = x.astype(np.float32).reshape(m, k // 32, 32)
    d = (np.abs(xb).max(-1) / np.float32(127)).astype(np.float32)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    q = np.rint(xb * inv[..., None]).astype(np.int32)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float32)
    return q.reshape(m, k).astype(np.int8), d, s


def parse_blocks(blocks: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [N, nb, 32] ints, d [N, nb], m [N, nb]) of GGUF blocks, from the byte layout."""
    b = blocks.reshape(blocks.shape[0], -1, BYTES[fmt])
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    if fmt == "q4_1":
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        qs = b[..., 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)
    elif fmt == "q4_1f":
        d = b[..., 0:4].copy().view(np.float32)[..., 0].astype(np.float64)
        m = b[..., 4:8].copy().view(np.float32)[..., 0].astype(np.float64)
        qs = b[..., 8:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int64)
    elif fmt == "q5_1f":
        d = b[..., 0:4].copy().view(np.float32)[..., 0].astype(np.float64)
        m = b[..., 4:8].copy().view(np.float32)[..., 0].astype(np.float64)
        q = b[..., 8:].astype(np.int64)
    elif fmt == "q6_k32":  # w = d * (sc * (q - 32)): the integer in brackets is the block's weight
        d = b[..., 0:4].copy().view(np.float32)[..., 0].astype(np.float64)
        m = np.zeros_like(d)
        sc = b[..., 4:6].copy().view(np.int8).astype(np.int64)
        q = np.repeat(sc, 16, axis=-1) * (b[..., 6:].astype(np.int64) - 32)
    elif fmt == "q5_0":  # w = d * (q - 16): as Q4_1 with q in 0..31 and m = -16 d (what the kernels compute)
        m = -16.0 * d
        qh = b[..., 2:6].copy().view(np.uint32)[..., 0].astype(np.int64)
        qs = b[..., 6:].astype(np.int64)
        fifth = (qh[..., None] >> np.arange(32)) & 1
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (fifth << 4)
    else:
        m = np.zeros_like(d)
        q = b[..., 2:].copy().view(np.int8).astype(np.int64)
    return q, d, m


def reference(x: torch.Tensor, blocks: torch.Tensor, fmt: str, bias: torch.Tensor | None):
    """y in float64 from the integer block dot products, and the magnitude sum_b |term| + |bias| of
    each output (the scale a float32 summation error is relative to)."""
    qx, dx, sx = quantize_x_ref(x.numpy())
    qw, dw, mw = parse_blocks(blocks.numpy(), fmt)
    m, k = x.shape
    qx = qx.reshape(m, k // 32, 32).astype(np.int64)
    sumi = np.einsum("nbk,mbk->mnb", qw, qx)
    terms = dw[None] * dx[:, None].astype(np.float64) * sumi + mw[None] * sx[:, None].astype(np.float64)
    y, mag = terms.sum(-1), np.abs(terms).sum(-1)
    if bias is not None:
        y, mag = y + bias.double().numpy(), mag + np.abs(bias.double().numpy())
    return y, mag


def q8_linear(kernels, x: torch.Tensor, blocks: torch.Tensor, fmt: str, bias: torch.Tensor | None, path: int):
    """gguf_linear_q8 on the blocks packed into tiles, as a q8 layer holds them."""
    tiles = kernels.gguf_q8_pack(blocks, FMT_ARG[fmt])
    return kernels.gguf_linear_q8(x, tiles, FMT_ARG[fmt], blocks.shape[0], torch.empty(0) if bias is None else bias, path)


# Not kernel paths: the VNNI (2) and AMX (3) paths of the build that runs them over portable AVX-512
# and emulated tile operations (emulated_kernels.py), so CPUs without them check those kernels too.
EMULATED = 100
PATHS = sorted(Q8_PATHS) + [EMULATED + 2, EMULATED + 3]
PATH_IDS = [Q8_PATHS[p] for p in sorted(Q8_PATHS)] + ["avx512-vnni-emulated", "amx-emulated"]


def path_kernels(request, kernels, path: int):
    """(the kernels module, the path to ask it for) for a test's path; skips a path this CPU lacks."""
    if path > EMULATED:
        import emulated_kernels

        why = emulated_kernels.why_not_available(path - EMULATED)
        if why:
            pytest.skip(why)
        return request.getfixturevalue("emulated_kernels"), path - EMULATED
    if path not in kernels.gguf_q8_paths():
        pytest.skip(f"this CPU cannot run the {Q8_PATHS[path]} path")
    return kernels, path


# ---- kernels ----

@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_activation_quantization_is_bitwise_the_reference(request, kernels, path):
    kernels, path = path_kernels(request, kernels, path)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 160, generator=g) * 4
    x[1, 32:64] = 0  # a zero block: d = 0, no division by zero
    x[2, :32] = torch.tensor([127.0] + [k + 0.5 for k in range(-15, 16)])  # d = 1: ties round to even
    x[3, 64:96] = -x[3, 64:96].abs()
    q, d, s = kernels.gguf_quantize_activations(x, path)
    rq, rd, rs = quantize_x_ref(x.numpy())
    assert np.array_equal(q.numpy(), rq)
    assert np.array_equal(d.numpy(), rd)
    assert np.array_equal(s.numpy(), rs)
    assert q[2, 1:4].tolist() == [-14, -14, -12]  # -14.5, -13.5, -12.5 to even


# K: 3, 5 and 19 blocks (multiples of 32, not of 64); N: the last 16-column tile has 13, 6 and
# 13 columns (both AVX2 halves partial, one half only).
SHAPES = [(96, 45), (160, 70), (608, 29)]


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 17, 64, 300])
@pytest.mark.parametrize("k,n", SHAPES)
def test_kernel_matches_integer_reference(request, kernels, path, fmt, rows, k, n):
    kernels, path = path_kernels(request, kernels, path)
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    weight = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g) if rows % 2 else None
    blocks = blocks_of(weight, fmt)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 3
    y = q8_linear(kernels, x, blocks, fmt, bias, path)
    ref, mag = reference(x, blocks, fmt, bias)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    err = np.abs(y.double().numpy() - ref)
    assert (err <= 1e-5 * mag + 1e-7).all(), f"max error {err.max():.3g}, relative {(err / mag).max():.3g}"


def extreme_blocks(fmt: str, n: int, k: int) -> torch.Tensor:
    """Every weight at its format's largest magnitude (Q4_1 15, Q5_0 and Q5_1F 31, Q8_0 -128, which only a
    file can hold; Q6_K32 quants 63 with scales -128), so the kernels' 16-bit and int16 partial
    sums are at their limits."""
    half = lambda v: np.array([v], dtype=np.float16).view(np.uint8)  # noqa: E731
    one = {"q4_1": np.concatenate([half(0.01), half(-0.1), np.full(16, 0xFF, np.uint8)]),
           "q4_1f": np.concatenate([np.array([0.01, -0.1], np.float32).view(np.uint8), np.full(16, 0xFF, np.uint8)]),
           "q5_0": np.concatenate([half(0.01), np.full(4, 0xFF, np.uint8), np.full(16, 0xFF, np.uint8)]),
           "q8_0": np.concatenate([half(0.01), np.full(32, 0x80, np.uint8)]),
           "q5_1f": np.concatenate([np.array([0.01, -0.1], np.float32).view(np.uint8), np.full(32, 31, np.uint8)]),
           "q6_k32": np.concatenate([np.array([0.01], np.float32).view(np.uint8), np.full(2, 0x80, np.uint8),
                                     np.full(32, 63, np.uint8)])}[fmt]
    return torch.from_numpy(np.tile(one, (n, k // 32)))


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [32, 64])
def test_kernel_at_the_limits_of_its_partial_sums(request, kernels, path, fmt, k):
    kernels, path = path_kernels(request, kernels, path)
    blocks = extreme_blocks(fmt, 21, k)
    for rows in (1, 6, 49):  # 49: AMX panels of 16 rows (every format), the last one partial
        x = torch.full((rows, k), 3.0)
        x[::2] *= -1  # x quantizes to +-127 in every position
        y = q8_linear(kernels, x, blocks, fmt, None, path)
        ref, mag = reference(x, blocks, fmt, None)
        err = np.abs(y.double().numpy() - ref)
        assert (err <= 1e-5 * mag + 1e-7).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("fmt", FORMATS)
def test_tiles_hold_the_weights_bit_for_bit(kernels, fmt):
    """Packed into tiles (37 outputs: the last tile has 5 columns), every row reads back as the
    GGUF dequantizer computes it from the blocks."""
    from llmserve.model.gguf_quant import dequantize_q4_1f

    g = torch.Generator().manual_seed(12)
    blocks = blocks_of(torch.randn(37, 96, generator=g), fmt)
    tiles = kernels.gguf_q8_pack(blocks, FMT_ARG[fmt])
    assert tiles.shape[0] == 3 and tiles.dtype == torch.uint8
    # 16 columns x 3 blocks a tile: the blocks' own bytes for Q4_1 (16 x 20) and Q4_1F (16 x 24), a
    # byte a weight plus fp16 scales for Q8_0 and Q5_0, plus float32 d and two int16-pair scales for Q6_K32
    assert tiles.shape[1] == 3 * {"q4_1": 320, "q4_1f": 384, "q8_0": 576, "q5_0": 544, "q6_k32": 704, "q5_1f": 640}[fmt]
    if fmt == "q4_1f":
        want = dequantize_q4_1f(blocks, 96)
    elif fmt == "q5_1f":
        want = dequantize_q5_1f(blocks, 96)
    elif fmt == "q6_k32":
        want = dequantize_q6_k32(blocks, 96)
    else:
        want = kernels.gguf_dequantize(blocks, {"q4_1": 0, "q8_0": 1, "q5_0": 2}[fmt], 96)
    rows = torch.tensor([36, 0, 17, 17, 5])
    assert torch.equal(kernels.gguf_q8_weight_rows(tiles, FMT_ARG[fmt], 37, 96, rows), want[rows])
    assert torch.equal(kernels.gguf_q8_weight_rows(tiles, FMT_ARG[fmt], 37, 96, torch.arange(37)), want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_paths_agree_and_auto_is_the_best(kernels, fmt):
    g = torch.Generator().manual_seed(11)
    blocks = blocks_of(torch.randn(50, 576, generator=g), fmt)
    for rows in (1, 4, 33):
        x = torch.randn(rows, 576, generator=g)
        ys = {p: q8_linear(kernels, x, blocks, fmt, None, p) for p in kernels.gguf_q8_paths()}
        best = ys[kernels.gguf_q8_paths()[-1]]
        assert torch.equal(q8_linear(kernels, x, blocks, fmt, None, -1), best)
        for y in ys.values():
            torch.testing.assert_close(y, best, atol=1e-4, rtol=1e-5)


def test_paths_listed_and_unavailable_path_refused(kernels):
    paths = kernels.gguf_q8_paths()
    assert paths[0] == 0 and paths == sorted(paths) and set(paths) <= set(Q8_PATHS)
    tiles = kernels.gguf_q8_pack(quantize(torch.randn(4, 64), "q8_0"), 1)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.gguf_linear_q8(torch.randn(2, 64), tiles, 1, 4, torch.empty(0), 9)
    with pytest.raises(RuntimeError, match="blocks of 32"):
        kernels.gguf_linear_q8(torch.randn(2, 40), tiles, 1, 4, torch.empty(0), -1)
    with pytest.raises(RuntimeError, match="do not match"):  # tiles of 4 outputs of 64 inputs
        kernels.gguf_linear_q8(torch.randn(2, 96), tiles, 1, 4, torch.empty(0), -1)
    with pytest.raises(RuntimeError, match="do not match"):
        kernels.gguf_linear_q8(torch.randn(2, 64), tiles, 1, 17, torch.empty(0), -1)
    with pytest.raises(RuntimeError, match="not format"):
        kernels.gguf_q8_pack(quantize(torch.randn(4, 64), "q8_0"), 6)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.gguf_q8_weight_rows(tiles, 1, 4, 64, torch.tensor([4]))


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0", "q5_0"])  # (Q4_K below, as Q4_1F: a layer format of its own)
def test_q8_is_close_to_float_activations(kernels, fmt):
    """Rounding x to 8 bits per block moves the output by about a percent of its scale."""
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(96, 576, generator=g)
    blocks = blocks_of(weight, fmt)
    for rows in (1, 64):
        x = torch.randn(rows, 576, generator=g)
        exact = GgufLinear(blocks, fmt, 576, None, kernels)
        q8 = GgufLinear(blocks, fmt, 576, None, kernels, activations="q8")
        assert torch.equal(exact.dequantized(), q8.dequantized())  # the tiles hold the same weights
        rel = (q8(x) - exact(x)).norm() / exact(x).norm()
        assert 0 < rel < 0.02


def test_q5_0_prefill_rows_take_8_bit_activations_too(kernels):
    """Q5_0's prefill rows (more than 4) go through the q8 tiles too."""
    g = torch.Generator().manual_seed(6)
    blocks = blocks_of(torch.randn(40, 160, generator=g), "q5_0")
    exact = GgufLinear(blocks, "q5_0", 160, None, kernels)
    q8 = GgufLinear(blocks, "q5_0", 160, None, kernels, activations="q8")
    x = torch.randn(9, 160, generator=g)
    y = q8(x)
    assert not torch.equal(y, exact(x))
    torch.testing.assert_close(y, q8_linear(kernels, x, blocks, "q5_0", None, -1))
    assert (y - exact(x)).norm() / exact(x).norm() < 0.02


def dequantize_q5_1f(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Q5_1F blocks' weights in float32: q * d + m (q * d exact, so one rounding, as ggml's Q5_K)."""
    b = blocks.numpy().reshape(blocks.shape[0], -1, 40)
    d, m = b[..., 0:4].copy().view(np.float32), b[..., 4:8].copy().view(np.float32)
    return torch.from_numpy(b[..., 8:].astype(np.float32) * d + m).reshape(-1, k)


def dequantize_q6_k32(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """Q6_K32 blocks' weights in float32 as ggml's Q6_K dequantizer rounds them: (d * scale) * (q - 32)."""
    b = blocks.numpy().reshape(blocks.shape[0], -1, 38)
    d = b[..., 0:4].copy().view(np.float32)
    sc = np.repeat(b[..., 4:6].copy().view(np.int8).astype(np.float32), 16, axis=-1)
    return torch.from_numpy((d * sc) * (b[..., 6:].astype(np.float32) - np.float32(32))).reshape(-1, k)


def _k_quant_cases():
    from llmserve.model.gguf_quant import dequantize_q4_1f, q4_k_as_q4_1f, q5_k_as_q5_1f, q6_k_as_q6_k32

    # K-quant -> (the q8 kernels' form, converter, its bytes per 32 weights, its dequantizer, seed)
    return {"q4_k": ("q4_1f", q4_k_as_q4_1f, 24, dequantize_q4_1f, 7),
            "q5_k": ("q5_1f", q5_k_as_q5_1f, 40, dequantize_q5_1f, 11),
            "q6_k": ("q6_k32", q6_k_as_q6_k32, 38, dequantize_q6_k32, 9)}


@pytest.mark.parametrize("kquant", ["q4_k", "q5_k", "q6_k"])
def test_k_quants_run_in_their_q8_form_with_the_same_weights(kernels, kquant):
    """Under q8 a K-quant layer's blocks become the q8 kernels' form (Q4_K -> Q4_1F, Q5_K -> Q5_1F,
    Q6_K -> Q6_K32) that dequantizes bit for bit as ggml dequantizes the file's blocks, and the
    layer computes with that form's q8 kernel."""
    from test_gguf_kquant import random_blocks

    from llmserve.model.gguf_quant import dequantize

    fmt, convert, nbytes, dequantize_form, seed = _k_quant_cases()[kquant]
    blocks = random_blocks(kquant, 24, 768, seed=seed)
    converted = convert(blocks)
    assert converted.shape == (24, 768 // 32 * nbytes)
    want = dequantize(blocks, kquant, 768)
    assert torch.equal(dequantize_form(converted, 768), want)
    layer = GgufLinear(blocks, kquant, 768, None, kernels, activations="q8")
    assert layer.fmt == fmt and torch.equal(layer.dequantized(), want)
    x = torch.randn(7, 768, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(layer(x), q8_linear(kernels, x, converted, fmt, None, -1))
    exact = GgufLinear(blocks, kquant, 768, None, kernels)
    assert 0 < (layer(x) - exact(x)).norm() / exact(x).norm() < 0.02


def test_gguf_linear_module_uses_q8_kernel(kernels):
    weight, bias = torch.randn(40, 128), torch.randn(40)
    layer = GgufLinear.from_float(weight, bias, "q4_1", kernels, activations="q8")
    x = torch.randn(2, 3, 128)
    y = layer(x)
    assert y.shape == (2, 3, 40)
    assert layer.blocks is None and layer.tiles is not None  # the tiles replace the blocks
    assert torch.equal(y.reshape(6, 40), q8_linear(kernels, x.reshape(6, 128), quantize(weight, "q4_1"), "q4_1", bias, -1))
    with pytest.raises(InvalidRequestError):
        GgufLinear.from_float(weight, bias, "q4_1", None, activations="q8")  # no kernels: no silent no-op
    with pytest.raises(InvalidRequestError):
        GgufLinear.from_float(weight, bias, "q4_1", kernels, activations="int4")


# ---- the engine ----

@pytest.fixture(scope="module")
def published_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q8act")
    make_published_gguf_model(folder)
    return folder


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q8act_float")
    make_model_folder(folder, llama_config())
    return folder


def test_engine_q8_greedy_mostly_matches_float_activations(kernels, published_model):
    """The tiny random model's next-token distributions are flat (top-2 gaps of a few hundredths),
    so rounding x flips some greedy choices; the logprobs stay within a few hundredths."""
    exact = make_llm(published_model)
    q8 = make_llm(published_model, activations="q8")
    layers = [m for m in q8.engine.runner.model.modules() if isinstance(m, GgufLinear)]
    assert sorted(m.fmt for m in layers) == ["q4_1"] * 8 + ["q8_0"]
    assert all(m.activations == "q8" for m in layers)
    prompts = random_prompts(8, [3, 9, 17, 30, 45, 64, 100, 130], seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a = exact.generate(prompts, params, use_tqdm=False)
    b = q8.generate(prompts, params, use_tqdm=False)
    agreed = tokens_before_first_difference(a, b)
    assert sum(x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0] for x, y in zip(a, b)) >= 7
    assert agreed >= 0.6 * 8 * 12, f"{agreed} of {8 * 12} greedy tokens before the first difference"
    # Logprobs of float32's continuations, scored by both (the same contexts, so every token counts).
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, a)]
    score = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    sa, sb = exact.generate(seqs, score, use_tqdm=False), q8.generate(seqs, score, use_tqdm=False)
    diffs = [abs(next(iter(u.values()))[0] - next(iter(v.values()))[0])
             for x, y in zip(sa, sb) for u, v in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:])]
    assert len(diffs) == sum(len(s) - 1 for s in seqs)
    assert 0 < float(np.mean(diffs)) < 0.1 and max(diffs) < 0.5, (float(np.mean(diffs)), max(diffs))


def test_tied_embedding_reads_the_q8_heads_tiles(kernels, tmp_path, monkeypatch):
    """A GGUF file's tied Q8_0 embedding: under q8 the head keeps only its tiles, and the embedding
    looks tokens up in them, bit for bit the rows of the file's blocks."""
    from test_gguf import build_llama_gguf

    monkeypatch.setenv("LLMSERVE_CACHE_DIR", str(tmp_path / "cache"))
    build_llama_gguf(tmp_path / "tied.gguf", tied=True)
    exact = make_llm(tmp_path / "tied.gguf").engine.runner.model
    q8_llm = make_llm(tmp_path / "tied.gguf", activations="q8")
    q8 = q8_llm.engine.runner.model
    head = q8.lm_head.impl
    assert head.fmt == "q8_0" and head.blocks is None and q8.embed_tokens.table is head
    # The exact head keeps the same tiles (gguf_linear_tiles reads them with float32 activations).
    assert exact.embed_tokens.table is exact.lm_head.impl and exact.lm_head.impl.activations == "float32"
    ids = torch.arange(exact.cfg.vocab_size).flip(0).reshape(-1, 2)
    assert torch.equal(q8.embed_tokens(ids), exact.embed_tokens(ids))
    (embd,) = [t for t in gguf.GGUFReader(tmp_path / "tied.gguf").tensors if t.name == "token_embd.weight"]
    blocks = torch.from_numpy(np.array(embd.data)).reshape(exact.cfg.vocab_size, -1)
    want = dequantize(blocks, "q8_0", exact.cfg.hidden_size)
    assert torch.equal(exact.embed_tokens(ids), want[ids])
    out = q8_llm.generate(random_prompts(2, [5, 40], seed=2), SamplingParams(temperature=0, max_tokens=4),
                          use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_engine_forced_format_with_q8(kernels, published_model):
    llm = make_llm(published_model, quantization="q8_0", activations="q8")
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, GgufLinear)]
    assert layers and all(m.fmt == "q8_0" and m.activations == "q8" for m in layers)
    out = llm.generate(random_prompts(2, [5, 40], seed=1), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 4 for o in out)


def test_config_rejects_unknown_activations():
    with pytest.raises(InvalidRequestError, match="activations"):
        EngineConfig(activations="int8")
    assert EngineConfig().activations == "float32"


@pytest.mark.parametrize("kw", [dict(quantization="none"), dict(quantization="int8"), dict(quantization="bf16"),
                                dict(dtype="bfloat16"), dict(device="cuda")])
def test_q8_refused_where_it_would_change_nothing(kernels, published_model, kw):
    with pytest.raises(InvalidRequestError, match="activations q8"):
        make_llm(published_model, activations="q8", **kw)


def test_q8_refused_on_a_float_model(kernels, float_model):
    with pytest.raises(InvalidRequestError, match="float weights"):
        make_llm(float_model, activations="q8")
    make_llm(float_model, activations="q8", quantization="q4_1")  # forced blocks: then it applies


def test_q8_refused_without_kernels(published_model, monkeypatch):
    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    with pytest.raises(InvalidRequestError, match="CPU kernels"):
        make_llm(published_model, activations="q8", quantization="q4_1")


def test_cli_flag():
    parser = build_parser()
    for argv in (["generate", "hi"], ["chat", "hi"], ["serve"], ["bench", "throughput"]):
        assert engine_kwargs(parser.parse_args(argv))["activations"] == "float32"
        assert engine_kwargs(parser.parse_args(argv + ["--activations", "q8"]))["activations"] == "q8"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "hi", "--activations", "int4"])
