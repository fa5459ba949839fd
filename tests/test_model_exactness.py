"""The engine computes what transformers computes: greedy tokens equal `generate(do_sample=False)`
token for token, and logprobs equal log_softmax of transformers' logits within 1e-4, for tiny
random Llama (GQA, tied and untied embeddings, llama3 and linear rope scaling) and Qwen2 models."""
from __future__ import annotations

import pytest
import torch

from llmserve.sampling_params import SamplingParams
from tiny_models import hf_greedy, hf_logits, llama_config, make_llm, make_model_folder, qwen2_config, random_prompts

TOL = 1e-4
NEW_TOKENS = 24
# Different lengths, generated together: 1 token, under a block, several blocks, past the
# original context of the llama3 rope config (64).
PROMPT_LENGTHS = [1, 5, 16, 17, 40, 97]

CONFIGS = {
    "llama_gqa_untied": lambda: llama_config(),
    "llama_gqa_tied": lambda: llama_config(tie_word_embeddings=True),
    "qwen2_qkv_bias": lambda: qwen2_config(),
    "llama_rope_llama3": lambda: llama_config(rope_scaling={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama_rope_linear": lambda: llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def model_case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_model_folder(folder, CONFIGS[request.param](), seed=len(request.param))
    return request.param, folder, hf


def _check_logprobs(position_logprobs, hf_row_logits: torch.Tensor, num_top: int) -> None:
    """Every returned (token -> logprob, rank) entry matches transformers' log_softmax; the top
    entries are transformers' top tokens."""
    ref = hf_row_logits.log_softmax(-1)
    for token, (logprob, rank) in position_logprobs.items():
        assert abs(logprob - ref[token].item()) < TOL, (token, logprob, ref[token].item())
    top_ids = {t for t, (_, r) in position_logprobs.items() if r <= num_top}
    assert len(top_ids) == num_top
    ref_top = ref.topk(num_top + 1).values
    # Our top set is a top set of the reference (ties at the cut-off are allowed either way).
    assert min(ref[t].item() for t in top_ids) >= ref_top[num_top - 1].item() - TOL


def test_greedy_and_logprobs_match_transformers(model_case):
    name, folder, hf = model_case
    llm = make_llm(folder)
    arch = llm.engine.model_config
    # The case is what it claims to be, on both sides.
    assert arch.tie_word_embeddings == hf.config.tie_word_embeddings == (name == "llama_gqa_tied")
    assert arch.num_kv_heads == 2 and arch.num_heads == 4
    assert arch.qkv_bias == (name == "qwen2_qkv_bias")
    if name.startswith("llama_rope_"):
        kind = name.removeprefix("llama_rope_")
        assert arch.rope_scaling["rope_type"] == hf.config.rope_parameters["rope_type"] == kind
    else:
        assert arch.rope_scaling is None
    prompts = random_prompts(len(PROMPT_LENGTHS), PROMPT_LENGTHS, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=20)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        comp = out.outputs[0]
        assert comp.token_ids == ref_ids, f"{name}: prompt of {len(prompt)} tokens diverges from transformers"
        assert comp.finish_reason == "length"
        assert len(comp.logprobs) == NEW_TOKENS
        for i, pos in enumerate(comp.logprobs):
            assert pos[ref_ids[i]][1] == 1  # greedy: the chosen token has rank 1
            _check_logprobs(pos, ref_logits[i], 20)
        ref_cum = sum(ref_logits[i].log_softmax(-1)[t].item() for i, t in enumerate(ref_ids))
        assert comp.cumulative_logprob == pytest.approx(ref_cum, abs=NEW_TOKENS * TOL)


def test_prompt_logprobs_match_transformers(model_case):
    name, folder, hf = model_case
    llm = make_llm(folder)
    prompt = random_prompts(1, [70], seed=2)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=5),
                       use_tqdm=False)[0]
    ref = hf_logits(hf, prompt)
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert prompt[pos] in entry
        _check_logprobs(entry, ref[pos - 1], 5)
        rank = int((ref[pos - 1] > ref[pos - 1][prompt[pos]]).sum()) + 1
        assert entry[prompt[pos]][1] == rank


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_model_folder(tmp_path, llama_config(), seed=7, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
    llm = make_llm(tmp_path)
    prompts = random_prompts(3, [3, 20, 33], seed=3)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)[0]
