"""bfloat16 runs and stays close to float32; the CPU paged-attention kernel matches the torch reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.metadata import AttentionBatch, AttentionLayer
from llmserve.sampling_params import SamplingParams
from tiny_models import hf_greedy, llama_config, make_llm, make_model_folder, random_prompts


@pytest.fixture(scope="module")
def folder_and_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("dtype-llama")
    return path, make_model_folder(path, llama_config())


def test_bfloat16_logprobs_close_to_float32(folder_and_hf):
    folder, _ = folder_and_hf
    prompts = random_prompts(4, [3, 11, 29, 50], seed=5)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    fp32 = make_llm(folder).generate(prompts, params, use_tqdm=False)
    bf16 = make_llm(folder, dtype="bfloat16").generate(prompts, params, use_tqdm=False)
    for a, b in zip(fp32, bf16):
        lp32, lp16 = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        shared = set(lp32) & set(lp16)
        assert len(shared) >= 3  # the top tokens mostly agree
        for t in shared:
            assert abs(lp32[t][0] - lp16[t][0]) < 0.15


def test_bfloat16_greedy_matches_transformers_mostly(folder_and_hf):
    folder, hf = folder_and_hf
    prompts = random_prompts(3, [7, 19, 33], seed=6)
    outs = make_llm(folder, dtype="bfloat16").generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    hf16 = hf.to(torch.bfloat16)
    try:
        agree = 0
        for p, o in zip(prompts, outs):
            ref, _ = hf_greedy(hf16, p, 8)
            agree += o.outputs[0].token_ids[0] == ref[0]
        assert agree >= 2  # bf16 roundings differ in places, but the first token rarely flips
    finally:
        hf.to(torch.float32)


def _random_batch(dtype, d=32, seed=0):
    """A mixed step over shuffled cache blocks: four decodes, a verify run of 5 tokens and two
    prefill chunks (one over a cached prefix), each writing its new tokens' K/V; q, k and v are
    strided slices of one fused qkv tensor, as the model passes them."""
    g = torch.Generator().manual_seed(seed)
    h, kvh, bs, nb = 8, 2, 4, 80
    new = np.array([1, 1, 1, 1, 5, 12, 9])
    lens = np.array([1, 4, 17, 33, 21, 12, 30])
    k_cache = torch.randn(nb * bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(nb * bs, kvh, d, generator=g).to(dtype)
    width = -(-int(lens.max()) // bs)
    perm = torch.randperm(nb, generator=g)
    tables = perm[:len(lens) * width].view(len(lens), width).int()
    t = int(new.sum())
    qkv = torch.randn(t, h + 2 * kvh, d, generator=g).to(dtype)
    q, k, v = qkv[:, :h], qkv[:, h:h + kvh], qkv[:, h + kvh:]
    pos = np.concatenate([np.arange(n - c, n) for n, c in zip(lens, new)])
    seq = np.repeat(np.arange(len(lens)), new)
    slots = tables.numpy()[seq, pos // bs].astype(np.int64) * bs + pos % bs
    qsl = np.concatenate(([0], np.cumsum(new)))
    batch = AttentionBatch(torch.from_numpy(slots), torch.from_numpy(qsl.astype(np.int32)),
                           torch.from_numpy(lens.astype(np.int32)), tables, bs, 4, qsl, lens)
    return q, k, v, k_cache, v_cache, batch


def test_fused_ops_match_torch_reference():
    from llmserve.kernels import cpu_kernels
    from llmserve.model.layers import RMSNorm, rotary_tables
    from llmserve.model.ops import CpuFusedOps, TorchOps

    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no C++ toolchain to build the CPU kernels")
    g = torch.Generator().manual_seed(3)
    fused, ref = CpuFusedOps(kernels), TorchOps()
    norm = RMSNorm(40, 1e-5)
    norm.weight.data = torch.randn(40, generator=g)
    x, r = torch.randn(7, 40, generator=g), torch.randn(7, 40, generator=g)
    (a, ra), (b, rb) = ref.add_rms_norm(x, r.clone(), norm), fused.add_rms_norm(x, r.clone(), norm)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ra, rb)
    gu = torch.randn(7, 24, generator=g)
    assert torch.allclose(ref.silu_mul(gu), fused.silu_mul(gu), atol=1e-6)
    qkv = torch.randn(7, 6, 16, generator=g)
    cos, sin = rotary_tables(torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g))
    q1, q2 = qkv.clone(), qkv.clone()
    ref.rotary_(q1, cos, sin, 4)
    fused.rotary_(q2, cos, sin, 4)
    assert torch.allclose(q1, q2, atol=1e-6)
    assert torch.equal(q2[:, 4:], qkv[:, 4:])  # the V heads are left alone


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("d", [32, 40])
@pytest.mark.parametrize("window,cap", [(None, None), (6, None), (None, 5.0)])
def test_cpu_paged_backend_matches_torch_backend(dtype, tol, d, window, cap):
    from llmserve.attention.cpu_paged import CpuPagedAttention
    from llmserve.kernels import cpu_kernels

    kernel = cpu_kernels()
    if kernel is None:
        pytest.skip("no C++ toolchain to build the CPU kernel")
    q, k, v, k_cache, v_cache, batch = _random_batch(dtype, d)
    layer = AttentionLayer(0, 0.2, window, cap)
    ref_caches = [(k_cache.float(), v_cache.float())]
    ref = TorchAttention(ref_caches)
    ref.prepare(batch)
    expected = ref.forward(layer, q.float(), k.float(), v.float())
    fast = CpuPagedAttention(kernel, [(k_cache, v_cache)])
    fast.prepare(batch)
    out = fast.forward(layer, q, k, v)
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max().item() < tol
    # The step's K/V landed in the caches, exactly where the reference put them.
    assert torch.equal(k_cache.float(), ref_caches[0][0]) and torch.equal(v_cache.float(), ref_caches[0][1])


@pytest.mark.parametrize("kernels", ["1", "0"], ids=["cpu-kernels", "plain-torch"])
def test_both_attention_paths_match_transformers_end_to_end(tmp_path_factory, monkeypatch, kernels):
    """head_dim 64, which the kernel's fast path takes; plain torch is the path CUDA runs. Chunks
    of 7 tokens, a warm prefix cache and mixed decode/prefill steps."""
    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", kernels)
    folder = tmp_path_factory.mktemp("hd64-llama")
    hf = make_model_folder(folder, llama_config(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                                intermediate_size=256), seed=3)
    prompts = random_prompts(6, [5, 40, 17, 64, 1, 33], seed=9)
    prompts.append(prompts[1] + [7, 8, 9])  # shares a 2-block prefix with prompt 1
    llm = make_llm(folder, max_num_batched_tokens=7, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for _ in range(2):
        outs = llm.generate(prompts, params, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)[0]
    assert llm.engine.kv.prefix_hits > 0


def test_engine_uses_plain_torch_when_asked(folder_and_hf, monkeypatch):
    from llmserve.model.ops import TorchOps

    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    folder, _ = folder_and_hf
    llm = make_llm(folder)
    assert type(llm.engine.runner.backend) is TorchAttention
    assert type(llm.engine.runner.model.ops) is TorchOps
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
