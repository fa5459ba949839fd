"""--kv-cache-dtype: a float16/bfloat16 or 8-bit float (fp8 e4m3, e5m2) KV cache under float32
compute. The reference is the same model over the same rounded K/V computed by plain torch
(TorchAttention), and the exact float32 cache for how far the rounding moves the logprobs."""
from __future__ import annotations

import statistics

import numpy as np
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


KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "fp8": torch.float8_e4m3fn,
             "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16", "fp8", "fp8_e5m2"])
def test_kernel_matches_plain_torch_over_the_same_narrow_cache(folder, kv_dtype, monkeypatch):
    llm, fast = _run(folder, kv_cache_dtype=kv_dtype)
    caches = llm.engine.runner.kv_caches
    assert {t.dtype for layer in caches for t in layer} == {KV_DTYPES[kv_dtype]}
    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    _, plain = _run(folder, kv_cache_dtype=kv_dtype)
    # Two paths' K differ by summation order (~1e-7), which can move a rounding into the cache by
    # one unit (2^-11 in float16, 2^-4 in e4m3): so not 1e-5 as with float32 caches
    # (tests/test_unified_attention.py checks the kernel over one and the same rounded cache to
    # float32 precision). An 8-bit unit moved early can turn a later near-tie: compare the tokens
    # up to the first that differs, and require most of them.
    tol = 2e-3 if KV_DTYPES[kv_dtype].itemsize == 2 else 5e-2
    same = 0
    for a, b in zip(fast, plain):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        same += n
        if KV_DTYPES[kv_dtype].itemsize == 2:
            assert n == len(ta)
        assert _chosen_logprobs(a)[:n] == pytest.approx(_chosen_logprobs(b)[:n], abs=tol)
    assert same >= 0.8 * sum(len(a.outputs[0].token_ids) for a in fast)


def test_narrow_cache_is_close_to_the_exact_one_and_holds_twice_the_tokens(folder):
    budget = 2 * 1024 * 1024
    exact_llm, exact = _run(folder, num_kv_blocks=None, kv_cache_memory=budget)
    half_llm, half = _run(folder, num_kv_blocks=None, kv_cache_memory=budget, kv_cache_dtype="float16")
    assert half_llm.engine.kv.pool.num_blocks == 2 * exact_llm.engine.kv.pool.num_blocks
    drift = [abs(x - y) for a, b in zip(exact, half) for x, y in zip(_chosen_logprobs(a), _chosen_logprobs(b))
             if a.outputs[0].token_ids == b.outputs[0].token_ids]
    assert drift and max(drift) < 5e-2  # float16 keeps 11 significant bits of every K and V
    assert max(drift) > 0  # and the cache really is narrower


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_cache_holds_four_times_the_tokens_and_stays_near_the_exact_one(folder, kv_dtype):
    budget = 2 * 1024 * 1024
    exact_llm, exact = _run(folder, num_kv_blocks=None, kv_cache_memory=budget)
    fp8_llm, fp8 = _run(folder, num_kv_blocks=None, kv_cache_memory=budget, kv_cache_dtype=kv_dtype)
    assert fp8_llm.engine.kv.pool.num_blocks == 4 * exact_llm.engine.kv.pool.num_blocks
    # This random model's K and V are large (median ~2) and its attention sharp, so 8-bit K/V
    # (e4m3 keeps 4 significant bits, e5m2 3) moves its logprobs by tenths, where float16 moved
    # them by thousandths, and can swap close next tokens: compare the first position's top-3
    # logprobs where both lists hold the token. A value read at the wrong scale (e4m3 is widened
    # at 2^-8 of its value) would move them by far more. SmolLM2's drift is in docs/benchmarks.md
    # (benchmarks/quant_drift.py).
    drift = []
    for a, b in zip(exact, fp8):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        drift += [abs(la[t][0] - lb[t][0]) for t in la if t in lb]
    assert len(drift) >= 2 * len(exact) and 0 < max(drift) < 2.0
    assert statistics.mean(drift) < 0.6


def test_bad_kv_cache_dtypes_are_refused(folder):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be one of"):
        make_llm(folder, kv_cache_dtype="int4")
    with pytest.raises(InvalidRequestError, match="float32 compute"):
        make_llm(folder, dtype="bfloat16", kv_cache_dtype="float16")
    with pytest.raises(InvalidRequestError, match="float32 compute"):
        make_llm(folder, dtype="bfloat16", kv_cache_dtype="fp8")


def test_fp8_blocks_move_bit_for_bit(folder):
    """What moves KV between blocks, tiers and engines (compaction, the disk tier, export/import,
    the wipe on free) goes through a byte view: torch has no index_copy_ or fill for float8."""
    runner = make_llm(folder, kv_cache_dtype="fp8", num_kv_blocks=16).engine.runner
    g = torch.Generator().manual_seed(3)
    for k, v in runner.kv_pages:
        k.copy_(torch.randn(k.shape, generator=g).to(k.dtype))
        v.copy_(torch.randn(v.shape, generator=g).to(v.dtype))
    bs = runner.block_size
    rows = lambda block: slice(block * bs, (block + 1) * bs)  # noqa: E731
    snapshot = [(k.clone(), v.clone()) for k, v in runner.kv_pages]
    runner.write_block(5, runner.read_block(2))  # the disk tier's round trip
    runner.move_kv("absent", np.arange(rows(3).start, rows(3).stop), np.arange(rows(6).start, rows(6).stop))
    exported = runner.export_kv([[1, 4]], None, 2 * bs - 3)  # a request's first tokens
    runner.import_kv([[7, 8]], None, exported)
    runner.wipe_blocks([9])
    for (k, v), (k0, v0) in zip(runner.kv_pages, snapshot):
        for now, before in ((k, k0), (v, v0)):
            now, before = now.view(torch.uint8), before.view(torch.uint8)
            assert torch.equal(now[rows(5)], before[rows(2)]) and torch.equal(now[rows(6)], before[rows(3)])
            assert torch.equal(now[rows(7)], before[rows(1)])
            assert torch.equal(now[rows(8)][:bs - 3], before[rows(4)][:bs - 3])
            assert not now[rows(9)].any() and torch.equal(now[rows(10)], before[rows(10)])
