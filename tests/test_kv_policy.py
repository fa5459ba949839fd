"""Per-request KV policies (engine/kv_policy.py): the eviction rules against references written
here from the papers' descriptions, and the engine against transformers run with an attention mask
that shows each token exactly what the policy left it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmserve.engine import kv_policy
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from tiny_models import llama_config, make_llm, make_model_folder, random_prompts

BLOCK = 4


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv-policy-llama")
    model = make_model_folder(path, llama_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=128), seed=7)
    model.config._attn_implementation = "eager"  # the reference below passes its own additive mask
    return model, path


# ---- the rules, on hand-made scores ------------------------------------------------------------
def test_streaming_keeps_sinks_and_the_most_recent():
    positions = np.arange(100, dtype=np.int64)
    keep = kv_policy.select_keep("streaming", positions, np.zeros(100), 20)
    assert positions[keep].tolist() == [0, 1, 2, 3] + list(range(84, 100))


def _heavy_hitter_reference(scores: list[float], target: int, recent: int) -> list[int]:
    """H2O's rule as its paper states it: the `recent` newest tokens, and of the others the
    target - recent with the largest accumulated attention (earlier token first on ties)."""
    n = len(scores)
    older = sorted(range(n - recent), key=lambda i: (-scores[i], i))[:target - recent]
    return sorted(older + list(range(n - recent, n)))


@pytest.mark.parametrize("policy", ["h2o", "keyformer"])
@pytest.mark.parametrize("target", [5, 10, 31])
def test_scored_policies_keep_recent_and_heavy_hitters(policy, target):
    rng = np.random.default_rng(target)
    scores = rng.random(40)
    scores[[3, 17]] = 5.0  # two clear heavy hitters
    scores[[8, 9]] = 0.5  # a tie
    fraction = 0.5 if policy == "h2o" else 0.3
    recent = max(1, round(target * fraction))
    keep = kv_policy.select_keep(policy, np.arange(40), scores, target)
    assert keep.tolist() == _heavy_hitter_reference(scores.tolist(), target, recent)
    assert len(keep) == target
    if target - recent >= 2:
        assert {3, 17} <= set(keep.tolist())


def test_h2o_score_is_the_attention_probability_summed_over_heads():
    logits = np.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [layers=1, heads=2, keys=3]
    p0 = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    np.testing.assert_allclose(kv_policy.attention_scores(logits), p0 + 1 / 3, rtol=1e-12)


def test_keyformer_score_is_a_gumbel_softmax_at_the_scheduled_temperature():
    logits = np.random.default_rng(0).normal(size=(2, 3, 7))
    tau = kv_policy.keyformer_tau(5, 20)
    assert tau == pytest.approx(1.0 + (2.0 - 1.0) * 5 / 20)
    assert kv_policy.keyformer_tau(0, 20) == 1.0 and kv_policy.keyformer_tau(20, 20) == 2.0
    got = kv_policy.keyformer_scores(logits, tau, np.random.default_rng(1))
    g = np.random.default_rng(1).gumbel(size=logits.shape)  # the same noise, drawn the same way
    want = np.zeros(7)
    for layer in range(2):
        for head in range(3):
            z = np.exp((logits[layer, head] + g[layer, head]) / tau)
            want += z / z.sum()
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.mark.parametrize("policy,budget", [("nope", 0.5), ("h2o", 0.0), ("h2o", 1.5), ("h2o", 3), ("h2o", True),
                                           ("h2o", "half")])
def test_bad_policy_or_budget_is_refused(policy, budget):
    with pytest.raises(InvalidRequestError):
        SamplingParams(kv_policy=policy, kv_budget=budget)


def test_fraction_budget_counts_the_current_length():
    assert kv_policy.budget_tokens(0.25, 100) == 25
    assert kv_policy.budget_tokens(0.25, 101) == 26
    assert kv_policy.budget_tokens(0.01, 100) == kv_policy.MIN_BUDGET_TOKENS
    assert kv_policy.budget_tokens(40, 1000) == 40


# ---- the engine ----------------------------------------------------------------------------------
def _reference_keep(policy: str, kept: list[int], scores: dict[int, float], target: int) -> list[int]:
    """The papers' rules over positions: StreamingLLM's 4 sinks and the newest tokens; H2O's and
    Keyformer's recent window (half, 30% of the target) and the highest accumulated scores."""
    if policy == "streaming":
        return kept[:4] + kept[len(kept) - (target - 4):]
    recent = max(1, round(target * (0.5 if policy == "h2o" else 0.3)))
    older = kept[:len(kept) - recent]
    heavy = sorted(older, key=lambda p: (-scores[p], p))[:target - recent]
    return sorted(heavy) + kept[len(kept) - recent:]


def _masked_greedy(model, prompt: list[int], max_tokens: int, budget: int, policy: str, seed: int = 0) -> list[int]:
    """Greedy decoding in transformers where each token attends exactly to what the policy left
    cached when it was computed: the prompt causally, then after each step, once more than
    `budget` tokens are cached (and, for the scored policies, once the prompt's last token has
    scored them), the policy's choice of the budget less a block. A scored policy's step scores
    the tokens the newest row attends to: its attention probabilities (H2O) or a Gumbel softmax of
    its logits (Keyformer), summed over layers and heads."""
    ids, out = list(prompt), []
    kept: list[int] = []
    scores: dict[int, float] = {}
    visible: dict[int, list[int]] = {p: list(range(p + 1)) for p in range(len(prompt))}
    new = list(range(len(prompt)))
    rng, steps = np.random.default_rng(seed), 0
    while len(out) < max_tokens:
        for p in new:
            visible.setdefault(p, kept + [p])
        n = len(ids)
        mask = torch.full((1, 1, n, n), -math.inf)
        for p, seen in visible.items():
            mask[0, 0, p, seen] = 0.0
        with torch.no_grad():
            res = model(torch.tensor([ids]), attention_mask=mask, position_ids=torch.arange(n)[None],
                        output_attentions=policy != "streaming")
        token = int(res.logits[0, -1].argmax())
        if policy != "streaming":
            last = n - 1
            seen = visible[last]
            probs = torch.stack([a[0, :, last, seen] for a in res.attentions]).double().numpy()  # [layers, heads, keys]
            if policy == "h2o":
                step = probs.sum(axis=(0, 1))
            else:
                tau = 1.0 + steps / max_tokens
                z = (np.log(probs) + rng.gumbel(size=probs.shape)) / tau
                e = np.exp(z - z.max(axis=-1, keepdims=True))
                step = (e / e.sum(axis=-1, keepdims=True)).sum(axis=(0, 1))
            for p, v in zip(seen, step):
                scores[p] = scores.get(p, 0.0) + v
            steps += 1
        kept += new
        if len(kept) > budget:
            kept = _reference_keep(policy, kept, scores, max(budget - BLOCK, (budget + 1) // 2))
        out.append(token)
        ids.append(token)
        new = [len(ids) - 1]
    return out


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("policy", ["streaming", "h2o", "keyformer"])
def test_policy_equals_transformers_masked_to_the_kept_tokens(model_and_folder, policy, backend, monkeypatch):
    """Through the CPU kernel (its decode_logits) and through the plain-torch backend."""
    model, folder = model_and_folder
    if backend == "torch":
        monkeypatch.setenv("LLMSERVE_CPU_KERNELS", "0")
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=64)
    prompts = random_prompts(3, [10, 5, 13], seed=3)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, kv_policy=policy, kv_budget=12, seed=21)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == _masked_greedy(model, prompt, 30, 12, policy, seed=21)
        assert o.kv_policy == policy and o.num_evicted_tokens > 0
    full = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert any(f.outputs[0].token_ids != o.outputs[0].token_ids for f, o in zip(full, outs))  # it did evict


@pytest.mark.parametrize("policy", ["streaming", "h2o", "keyformer"])
@pytest.mark.parametrize("budget", [1.0, 64])
def test_budget_at_least_the_context_equals_full(model_and_folder, policy, budget):
    _, folder = model_and_folder
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=128)
    prompts = random_prompts(4, [9, 30, 2, 17], seed=5)
    lossy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2,
                                                 kv_policy=policy, kv_budget=budget), use_tqdm=False)
    full = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2),
                        use_tqdm=False)
    for a, b in zip(lossy, full):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.num_evicted_tokens == 0 and a.kv_policy == policy and b.kv_policy is None


@pytest.mark.parametrize("policy", ["streaming", "h2o", "keyformer"])
def test_held_blocks_stay_within_the_budget_and_idle_means_free(model_and_folder, policy):
    _, folder = model_and_folder
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=64)
    engine = llm.engine
    budget = 16
    params = SamplingParams(temperature=0, max_tokens=4 * budget, ignore_eos=True, kv_policy=policy, kv_budget=budget)
    for i, prompt in enumerate(random_prompts(3, [6, 12, 3], seed=9)):
        engine.add_request(f"r{i}", prompt, params)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        for rid, table in engine.kv.block_tables.items():
            most = max(most, len(table))
            assert len(table) <= -(-budget // BLOCK) + 1, rid
    assert most >= budget // BLOCK  # the budget was reached
    assert engine.kv.num_free_blocks == engine.kv.pool.num_blocks
    assert not engine.kv.block_tables


def test_lossy_requests_do_not_publish_or_hit_the_prefix_cache(model_and_folder):
    _, folder = model_and_folder
    llm = make_llm(folder, block_size=BLOCK, num_kv_blocks=64)
    prompt = random_prompts(1, [24], seed=11)[0]
    lossy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, kv_policy="streaming", kv_budget=0.5)
    llm.generate([prompt], lossy, use_tqdm=False)
    again = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert again.num_cached_tokens == 0
    llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert llm.generate([prompt], lossy, use_tqdm=False)[0].num_cached_tokens == 0


def test_lossy_policy_needs_a_budget_and_full_attention_layers(model_and_folder, tmp_path):
    _, folder = model_and_folder
    llm = make_llm(folder)
    with pytest.raises(InvalidRequestError, match="kv_budget"):
        llm.generate([[1, 2, 3]], SamplingParams(kv_policy="h2o"), use_tqdm=False)
    from tiny_models import qwen2_config

    make_model_folder(tmp_path / "sw", qwen2_config(use_sliding_window=True, sliding_window=8, max_window_layers=0))
    windowed = make_llm(tmp_path / "sw")
    with pytest.raises(InvalidRequestError, match="sliding-window"):
        windowed.generate([[1, 2, 3]], SamplingParams(kv_policy="streaming", kv_budget=8), use_tqdm=False)
