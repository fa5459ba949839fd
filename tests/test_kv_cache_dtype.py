"""--kv-cache-dtype: a float16/bfloat16 KV cache under float32 compute. The reference is the same
model over the same rounded K/V computed by plain torch (TorchAttention), and the exact float32
cache for how far the rounding moves the logprobs."""
from __future__ import annotations

import pytest
import torch

from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-dtype-llama")
    # head_dim 64: the kernel's vector decode path
    make_model_folder(path, llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=256), seed=4)
    return path


PROMPTS = random_prompts(5, [3, 40, 17, 70, 1], seed=2)
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def _run(folder, **kwargs):
    # Chunks of 16 tokens: steps mix decodes with prefill chunks over a cached prefix.
    llm = make_llm(folder, max_num_batched_tokens=16, **kwargs)
    return llm, llm.generate(PROMPTS, PARAMS, use_tqdm=False)


def _chosen_logprobs(out) -> list[float]:
    c = out.outputs[0]
    return [pos[t][0] for t, pos in zip(c.token_ids, c.logprobs)]


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_kernel_matches_plain_torch_over_the_same_narrow_cache(folder, kv_dtype, monkeypatch):
    llm, fast = _run(folder, kv_cache_dtype=kv_dtype)
    caches = llm.engine.runner.kv_caches
    assert {t.dtype for layer in caches for t in layer} == {getattr(torch, kv_dtype)}
    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    _, plain = _run(folder, kv_cache_dtype=kv_dtype)
    for a, b in zip(fast, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        # Two paths' K differ by summation order (~1e-7), which can move a float16 rounding by one
        # unit (2^-11): so not 1e-5 as with float32 caches (tests/test_unified_attention.py checks
        # the kernel over one and the same rounded cache to float32 precision).
        assert _chosen_logprobs(a) == pytest.approx(_chosen_logprobs(b), abs=2e-3)


def test_narrow_cache_is_close_to_the_exact_one_and_holds_twice_the_tokens(folder):
    budget = 2 * 1024 * 1024
    exact_llm, exact = _run(folder, num_kv_blocks=None, kv_cache_memory=budget)
    half_llm, half = _run(folder, num_kv_blocks=None, kv_cache_memory=budget, kv_cache_dtype="float16")
    assert half_llm.engine.kv.pool.num_blocks == 2 * exact_llm.engine.kv.pool.num_blocks
    drift = [abs(x - y) for a, b in zip(exact, half) for x, y in zip(_chosen_logprobs(a), _chosen_logprobs(b))
             if a.outputs[0].token_ids == b.outputs[0].token_ids]
    assert drift and max(drift) < 5e-2  # float16 keeps 11 significant bits of every K and V
    assert max(drift) > 0  # and the cache really is narrower


def test_bad_kv_cache_dtypes_are_refused(folder):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of"):
        make_llm(folder, kv_cache_dtype="int4")
    with pytest.raises(InvalidRequestError, match="float32 compute"):
        make_llm(folder, dtype="bfloat16", kv_cache_dtype="float16")
