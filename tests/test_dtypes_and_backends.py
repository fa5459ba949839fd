"""bfloat16 runs and stays close to float32; the CPU paged-attention kernel matches the torch reference."""
from __future__ import annotations

import pytest
import torch

from llmserve.attention.backend import TorchAttention
from llmserve.attention.metadata import AttentionMetadata
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


def _random_paged_case(dtype, d=32, seed=0):
    """Six decoding sequences over shuffled cache blocks, each writing its newest token's K/V this
    step; q, k and v are strided slices of one fused qkv tensor, as the model passes them."""
    g = torch.Generator().manual_seed(seed)
    b, h, kvh, bs, nb = 6, 8, 2, 4, 40
    k_cache = torch.randn(nb * bs, kvh, d, generator=g).to(dtype)
    v_cache = torch.randn(nb * bs, kvh, d, generator=g).to(dtype)
    lens = torch.tensor([1, 4, 5, 17, 33, 9], dtype=torch.int32)
    width = -(-int(lens.max()) // bs)
    tables = torch.stack([torch.randperm(nb, generator=g)[:width] for _ in range(b)]).int()
    qkv = torch.randn(b, h + 2 * kvh, d, generator=g).to(dtype)
    q, k, v = qkv[:, :h], qkv[:, h:h + kvh], qkv[:, h + kvh:]
    last = (lens - 1).long()
    slot_mapping = tables.long()[torch.arange(b), last // bs] * bs + last % bs
    meta = AttentionMetadata(slot_mapping, b, None, None, [], bs, tables, lens)
    return q, k, v, k_cache, v_cache, meta


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
def test_cpu_paged_kernel_matches_reference(dtype, tol, d):
    from llmserve.attention.cpu_paged import CpuPagedAttention
    from llmserve.kernels import cpu_kernels

    kernel = cpu_kernels()
    if kernel is None:
        pytest.skip("no C++ toolchain to build the CPU kernel")
    q, k, v, k_cache, v_cache, meta = _random_paged_case(dtype, d)
    ref_k, ref_v = k_cache.float(), v_cache.float()
    ref = TorchAttention()(q.float(), k.float(), v.float(), ref_k, ref_v, meta, 0.2)
    out = CpuPagedAttention(kernel)(q, k, v, k_cache, v_cache, meta, 0.2)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max().item() < tol
    # The step's K/V landed in the caches, exactly where the reference put them.
    assert torch.equal(k_cache.float(), ref_k) and torch.equal(v_cache.float(), ref_v)


def test_engine_uses_plain_torch_when_asked(folder_and_hf, monkeypatch):
    from llmserve.model.ops import TorchOps

    monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    folder, _ = folder_and_hf
    llm = make_llm(folder)
    assert type(llm.engine.runner.backend) is TorchAttention
    assert type(llm.engine.runner.model.ops) is TorchOps
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
