"""Weight-only int8 / bf16 linear layers: the streaming kernel equals the dequantized reference,
and a quantized engine stays close to float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmserve.errors import InvalidRequestError
from llmserve.model.weight_only import WeightOnlyLinear
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts


@pytest.mark.parametrize("fmt", ["int8", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 17, 40, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_matches_dequantized_linear(kernels, fmt, rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(70, 48 + 5, generator=g)  # K not a multiple of 16: the tail path runs too
    bias = torch.randn(70, generator=g) if with_bias else None
    layer = WeightOnlyLinear(weight, bias, fmt, kernels)
    x = torch.randn(rows, weight.shape[1], generator=g)
    ref = F.linear(x, layer.dequantized(), bias)
    assert torch.allclose(layer(x), ref, atol=1e-4, rtol=1e-4)
    # The stored weight is close to the original: per-row int8 or bf16 rounding only.
    err = (layer.dequantized() - weight).abs().max().item()
    assert err <= (weight.abs().amax().item() / 127 if fmt == "int8" else weight.abs().amax().item() / 128)


def test_3d_input_and_fallback_without_kernels():
    weight = torch.randn(8, 16)
    layer = WeightOnlyLinear(weight, None, "int8", None)
    x = torch.randn(2, 3, 16)
    assert torch.allclose(layer(x), F.linear(x, layer.dequantized()), atol=1e-5)


def test_unknown_format_is_a_typed_error():
    with pytest.raises(InvalidRequestError):
        WeightOnlyLinear(torch.randn(4, 4), None, "fp4", None)


@pytest.mark.parametrize("fmt,tol", [("bf16", 0.05), ("int8", 0.2)])
def test_quantized_engine_close_to_float32(tmp_path, fmt, tol):
    make_model_folder(tmp_path, llama_config(tie_word_embeddings=True))
    prompts = random_prompts(4, [4, 9, 20, 33], seed=11)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=3)
    ref = make_llm(tmp_path).generate(prompts, params, use_tqdm=False)
    llm = make_llm(tmp_path, quantization=fmt)
    model = llm.engine.runner.model
    assert isinstance(model.lm_head.impl, WeightOnlyLinear) and model.lm_head.impl.fmt == fmt
    assert all(isinstance(layer.mlp.down_proj.impl, WeightOnlyLinear) for layer in model.layers)
    out = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(ref, out):
        lp_a, lp_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        for t in set(lp_a) & set(lp_b):
            assert abs(lp_a[t][0] - lp_b[t][0]) < tol
    # Longer greedy runs work and leave the engine idle and clean.
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.pool.num_blocks


def test_quantization_needs_float32(tmp_path):
    make_model_folder(tmp_path, llama_config())
    with pytest.raises(InvalidRequestError):
        make_llm(tmp_path, dtype="bfloat16", quantization="int8")
