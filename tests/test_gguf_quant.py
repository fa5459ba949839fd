"""GGUF block formats (Q4_1, Q8_0) as weight storage: the kernels equal a float32 matmul with the
dequantized weights, the lossless check recognizes exactly the weights a format holds, and a model
published in these formats runs on them by default, token for token as transformers runs it."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmserve.errors import InvalidRequestError
from llmserve.model.gguf_quant import GgufLinear, dequantize, find_lossless_format, quantize
from llmserve.sampling_params import SamplingParams
from tiny_models import hf_greedy, make_llm, make_published_gguf_model, random_prompts

FORMATS = ["q4_1", "q8_0"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_kernel_is_bitwise_ggml(kernels, fmt):
    w = torch.randn(37, 96, generator=torch.Generator().manual_seed(1)) * 3
    blocks = quantize(w, fmt)
    expected = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[fmt.upper()])
    layer = GgufLinear(blocks, fmt, 96, None, kernels)
    assert torch.equal(layer.dequantized(), torch.from_numpy(np.asarray(expected, dtype=np.float32)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9, 17, 64, 65, 200])
@pytest.mark.parametrize("k", [128, 256, 320])  # 4 blocks (no group of 8), exactly 8, 8 + 2
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_float_matmul_of_dequantized(kernels, fmt, rows, k, with_bias):
    g = torch.Generator().manual_seed(rows + k)
    weight = torch.randn(70, k, generator=g)
    bias = torch.randn(70, generator=g) if with_bias else None
    layer = GgufLinear.from_float(weight, bias, fmt, kernels)
    assert torch.equal(layer.dequantized(), dequantize(quantize(weight, fmt), fmt, k))
    x = torch.randn(rows, k, generator=g)
    ref = F.linear(x.double(), layer.dequantized().double(), None if bias is None else bias.double())
    assert torch.allclose(layer(x).double(), ref, atol=1e-4, rtol=1e-4)
    # 3-D input keeps its leading shape.
    assert layer(x.reshape(1, rows, k)).shape == (1, rows, 70)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("k", [96, 320])
@pytest.mark.parametrize("with_bias", [False, True])
def test_exact_tiles_give_a_row_the_same_bits_in_any_batch(kernels, fmt, k, with_bias):
    """Exact Q4_1/Q8_0 layers hold gguf_q8_pack's tiles: a row computed alone, in a batch of up to 8
    (the few-row kernel, weights widened in registers) or of more (the widened-tile GEMM) comes out
    bit for bit the same, and from 9 rows on equals the GEMM over GGUF's own blocks (which widens
    the same weights through transposes)."""
    g = torch.Generator().manual_seed(k + with_bias)
    weight = torch.randn(37, k, generator=g)  # 2 whole tiles of 16 and a part
    bias = torch.randn(37, generator=g) if with_bias else None
    layer = GgufLinear.from_float(weight, bias, fmt, kernels)
    assert layer.blocks is None and layer.tiles is not None and layer.activations == "float32"
    blocks = quantize(weight, fmt)
    code = {"q4_1": 0, "q8_0": 1}[fmt]
    no_bias = torch.empty(0) if bias is None else bias
    x = torch.randn(70, k, generator=g)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    ref = F.linear(x.double(), dequantize(blocks, fmt, k).double(), None if bias is None else bias.double())
    assert torch.allclose(alone.double(), ref, atol=1e-4, rtol=1e-4)
    for rows in [2, 3, 4, 5, 6, 7, 8, 9, 12, 70]:
        y = layer(x[:rows])
        assert torch.equal(y, alone[:rows]), rows
        if rows > 8:
            assert torch.equal(y, kernels.gguf_linear(x[:rows], blocks, code, no_bias)), rows


def test_exact_tiles_reject_what_they_do_not_hold(kernels):
    tiles = kernels.gguf_q8_pack(quantize(torch.randn(20, 64), "q4_1"), 0)
    x = torch.randn(3, 64)
    assert kernels.gguf_linear_tiles(x, tiles, 0, 20, torch.empty(0)).shape == (3, 20)
    for args in [(x, tiles, 2, 20, torch.empty(0)),            # Q5_0 is not an exact-tile format
                 (x, tiles, 0, 40, torch.empty(0)),            # more outputs than the tiles hold
                 (torch.randn(3, 96), tiles, 0, 20, torch.empty(0)),  # wider x than the tiles
                 (x, tiles, 1, 20, torch.empty(0)),            # Q8_0's tile blocks are larger
                 (x, tiles, 0, 20, torch.randn(19))]:          # a bias of the wrong length
        with pytest.raises(RuntimeError):
            kernels.gguf_linear_tiles(*args)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fallback_without_kernels(fmt):
    weight = torch.randn(8, 64)
    layer = GgufLinear.from_float(weight, None, fmt, None)
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), F.linear(x, dequantize(layer.blocks, fmt, 64)), atol=1e-5)


def test_lossless_format_is_found_only_for_weights_a_format_holds():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 64, generator=g)
    assert find_lossless_format(w) is None  # float weights
    for fmt in FORMATS:
        published = quantize(w, fmt)
        found = find_lossless_format(dequantize(published, fmt, 64))
        assert found is not None and found[0] == fmt
        assert torch.equal(found[1], published)  # the very bytes it was published with
    # One weight off by one ulp is no longer held exactly.
    w41 = dequantize(quantize(w, "q4_1"), "q4_1", 64)
    w41[5, 7] = torch.nextafter(w41[5, 7], torch.tensor(1e9))
    assert find_lossless_format(w41, ("q4_1",)) is None
    # Rows that are not whole blocks, and non-float32 tensors, are not candidates.
    assert find_lossless_format(torch.zeros(4, 40)) is None
    assert find_lossless_format(torch.zeros(4, 64, dtype=torch.bfloat16)) is None


def test_unknown_format_and_ragged_rows_are_typed_errors():
    with pytest.raises(InvalidRequestError):
        quantize(torch.randn(4, 64), "q3_k")
    with pytest.raises(InvalidRequestError):
        quantize(torch.randn(4, 40), "q4_1")


@pytest.fixture(scope="module")
def published_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q41")
    hf = make_published_gguf_model(folder)
    return folder, hf


def test_published_formats_are_kept_and_greedy_matches_transformers(kernels, published_model):
    folder, hf = published_model
    llm = make_llm(folder)  # quantization="auto"
    model = llm.engine.runner.model
    kept = [m for m in model.modules() if isinstance(m, GgufLinear)]
    assert sorted(m.fmt for m in kept) == ["q4_1"] * 8 + ["q8_0"]  # 2 layers x 4 projections + the head
    prompts = random_prompts(4, [3, 17, 30, 64], seed=5)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1),
                        use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids, logits = hf_greedy(hf, prompt, 10)
        assert out.outputs[0].token_ids == ids
        ref = torch.log_softmax(logits, dim=-1)
        for step, (token, lp) in enumerate(zip(ids, out.outputs[0].logprobs)):
            assert abs(lp[token][0] - ref[step, token].item()) < 1e-4


def test_none_keeps_float_and_forced_format_is_close(kernels, published_model):
    folder, _ = published_model
    prompts = random_prompts(3, [5, 12, 40], seed=9)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    float_llm = make_llm(folder, quantization="none")
    assert not any(isinstance(m, GgufLinear) for m in float_llm.engine.runner.model.modules())
    ref = float_llm.generate(prompts, params, use_tqdm=False)
    auto = make_llm(folder).generate(prompts, params, use_tqdm=False)
    for a, b in zip(ref, auto):  # same weights, another summation order
        for t, lp in a.outputs[0].logprobs[0].items():
            assert abs(lp[0] - b.outputs[0].logprobs[0][t][0]) < 1e-4
    # q8_0 forced on every layer re-rounds the Q4_1 projections: close, not equal.
    forced = make_llm(folder, quantization="q8_0")
    assert all(m.fmt == "q8_0" for m in forced.engine.runner.model.modules() if isinstance(m, GgufLinear))
    out = forced.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ref, out):
        for t in set(a.outputs[0].logprobs[0]) & set(b.outputs[0].logprobs[0]):
            assert abs(a.outputs[0].logprobs[0][t][0] - b.outputs[0].logprobs[0][t][0]) < 0.2
