"""The decoder stack (csrc/decoder_stack.cpp) against the Python layers it replaces.

It calls the same kernels in the same order, so everything it produces must be the Python path's bit
for bit: token ids and logprobs of whole engine runs (mixed prefill chunks and decodes, preemption
aside), over every kind of projection and KV cache it takes. Where the model or step is one it does
not take, the Python layers run instead, with the same results."""
from __future__ import annotations

import pytest
import torch

from llmserve.sampling_params import SamplingParams

from tiny_models import llama_config, make_llm, make_model_folder, make_published_gguf_model, qwen2_config, random_prompts


@pytest.fixture(scope="module")
def published_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack_gguf")
    make_published_gguf_model(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):  # biases on q/k/v
    folder = tmp_path_factory.mktemp("stack_qwen2")
    make_model_folder(folder, qwen2_config())
    return folder


@pytest.fixture(scope="module")
def mistral_model(tmp_path_factory):  # a sliding window of 8 tokens
    from transformers import MistralConfig

    folder = tmp_path_factory.mktemp("stack_mistral")
    cfg = llama_config()
    make_model_folder(folder, MistralConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "initializer_range")},
        sliding_window=8, tie_word_embeddings=False))
    return folder


class CountingStack:
    """Wraps a model's stack to count the steps it ran."""

    def __init__(self, stack) -> None:
        self.stack, self.calls = stack, 0

    def forward(self, *args):
        self.calls += 1
        return self.stack.forward(*args)


def _run(llm, prompts, params, stack: bool):
    model = llm.engine.runner.model
    model.use_decoder_stack = stack
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, repr(o.outputs[0].logprobs)) for o in outs]


def _counting(llm) -> CountingStack:
    model = llm.engine.runner.model
    model.use_decoder_stack = True
    llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # builds it
    assert model._stack is not None, "the stack should take this model"
    model._stack = CountingStack(model._stack)
    return model._stack


CASES = {
    "published q4_1 + q8_0 head": ("published_model", {}),
    "8-bit activations": ("published_model", {"activations": "q8"}),
    "forced q8_0": ("published_model", {"quantization": "q8_0"}),
    "float16 kv cache": ("published_model", {"kv_cache_dtype": "float16"}),
    "fp8 kv cache": ("published_model", {"kv_cache_dtype": "fp8", "activations": "q8"}),
    "qwen2 biases, forced q4_1": ("qwen2_model", {"quantization": "q4_1"}),
    "mistral sliding window, forced q8_0": ("mistral_model", {"quantization": "q8_0"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stack_equals_the_python_layers_bit_for_bit(kernels, request, case):
    fixture, kw = CASES[case]
    # A small token budget: prompts go in chunks, beside other requests' decodes.
    # No prefix caching: a second run would attend to the first run's cached blocks in other chunks.
    llm = make_llm(request.getfixturevalue(fixture), max_num_batched_tokens=48, enable_prefix_caching=False, **kw)
    counter = _counting(llm)
    prompts = random_prompts(6, [1, 7, 30, 64, 100, 3], seed=11)
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=3)
    with_stack = _run(llm, prompts, params, stack=True)
    steps = counter.calls
    assert steps >= 14
    python = _run(llm, prompts, params, stack=False)
    assert counter.calls == steps  # the second run did not touch it
    assert with_stack == python


def test_stack_hidden_states_are_the_python_layers(kernels, published_model):
    """The model's forward directly, one mixed step: the hidden states themselves, bit for bit."""
    llm = make_llm(published_model)
    _counting(llm)
    runner, model = llm.engine.runner, llm.engine.runner.model
    seen = {}
    forward = type(model).forward

    def spy(self, input_ids, positions, backend):
        out = forward(self, input_ids, positions, backend)
        self.use_decoder_stack = not self.use_decoder_stack
        # The same step again through the other path: its K/V writes land in the same slots with the same values.
        seen.setdefault("pairs", []).append((out.clone(), forward(self, input_ids, positions, backend).clone()))
        self.use_decoder_stack = not self.use_decoder_stack
        return out

    type(model).forward = spy
    try:
        llm.generate(random_prompts(3, [20, 5, 41], seed=2), SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    finally:
        type(model).forward = forward
    assert len(seen["pairs"]) >= 4
    for a, b in seen["pairs"]:
        assert torch.equal(a, b)
    assert runner is llm.engine.runner


def test_scored_kv_policy_steps_take_the_python_layers(kernels, published_model):
    """H2O needs each layer's decode attention logits, which the stack does not report: its steps go
    through the Python layers, and the results are the same as without the stack."""
    llm = make_llm(published_model, enable_prefix_caching=False)
    counter = _counting(llm)
    prompts = random_prompts(3, [10, 5, 13], seed=3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, kv_policy="h2o", kv_budget=12, seed=21)
    before = counter.calls
    with_stack = _run(llm, prompts, params, stack=True)
    assert counter.calls - before < 5  # prefill steps may use it; decodes of scored requests do not
    assert with_stack == _run(llm, prompts, params, stack=False)


@pytest.mark.parametrize("kw", [{}, {"quantization": "none"}])
def test_models_the_stack_does_not_take(kernels, tmp_path, published_model, kw):
    """Float weights (no GGUF projections) and Qwen3's per-head norms keep the Python layers."""
    if kw:
        llm = make_llm(published_model, **kw)
    else:
        from transformers import Qwen3Config

        cfg = llama_config()
        folder = tmp_path / "qwen3"
        make_model_folder(folder, Qwen3Config(
            vocab_size=cfg.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, tie_word_embeddings=False))
        llm = make_llm(folder, quantization="q4_1")
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    model = llm.engine.runner.model
    assert model._stack_built and model._stack is None


def test_stack_refuses_mismatched_layers(kernels):
    hidden, heads, kv_heads, dim = 64, 4, 2, 16
    norm = torch.ones(hidden)
    stack = kernels.DecoderStack(heads, kv_heads, dim, norm, 1e-5)

    def proj(n):
        return kernels.StackProjection(torch.zeros(n, 40, dtype=torch.uint8), torch.empty(0), 0, n, False, -1)

    good = dict(qkv=proj(hidden + 2 * 32), o=proj(hidden), gate_up=proj(256), down=proj(hidden))
    layer = kernels.StackLayer(norm, 1e-5, norm, 1e-5, *good.values(), 0, 0, 0.25, 0, 0.0)
    stack.add_layer(layer)
    assert stack.num_layers == 1
    bad = dict(good, qkv=proj(hidden))
    with pytest.raises(RuntimeError, match="do not match"):
        stack.add_layer(kernels.StackLayer(norm, 1e-5, norm, 1e-5, *bad.values(), 0, 0, 0.25, 0, 0.0))
    with pytest.raises(RuntimeError, match="norm"):
        stack.add_layer(kernels.StackLayer(torch.ones(3), 1e-5, norm, 1e-5, *good.values(), 0, 0, 0.25, 0, 0.0))
    with pytest.raises(RuntimeError, match="hidden"):
        stack.forward(torch.zeros(2, 5), torch.zeros(2, dim), torch.zeros(2, dim), [], [], [], [],
                      torch.zeros(2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 16)
    with pytest.raises(RuntimeError, match="bad head counts"):
        kernels.DecoderStack(3, 2, dim, norm, 1e-5)
