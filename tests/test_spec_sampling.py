"""Speculative decoding, sampled: verification keeps the target's distribution (a chi-square test
against transformers' own, with a deliberately different draft model), and seeded requests give
the same tokens alone, in a batch, and without speculation."""
from __future__ import annotations


import pytest
import torch
from scipy.stats import chisquare

from llmserve.sampling.verify import num_accepted, verify_rows
from llmserve.sampling_params import SamplingParams
from test_engine import assert_idle
from tiny_models import hf_logits, llama_config, make_llm, make_model_folder, random_prompts

PROMPT = [72, 101, 108, 108]
TOP_K, TEMPERATURE, FREQUENCY = 2, 0.9, -1.5  # a negative penalty makes repeats likely: the history matters
MAX_TOKENS = 4  # the second step verifies two drafts and may add a bonus token


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random target, and a draft made from it with heavy noise: it agrees with the target
    on some tokens and not others, so both the accept and the reject branch run."""
    target = tmp_path_factory.mktemp("spec-sampled-target")
    hf = make_model_folder(target, llama_config(), seed=21)
    draft = tmp_path_factory.mktemp("spec-sampled-draft")
    noisy = make_model_folder(draft, llama_config(), seed=21)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    noisy.save_pretrained(draft)
    return target, hf, draft


def _params(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=TEMPERATURE, top_k=TOP_K, frequency_penalty=FREQUENCY,
                          max_tokens=MAX_TOKENS, ignore_eos=True, seed=seed, **kw)


def _reference(hf) -> dict[tuple[int, ...], float]:
    """P(t1..t4) under the target alone, processed as the engine does: frequency penalty over the
    output so far, then temperature, then top-k."""
    probs: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(MAX_TOKENS):
        nxt = {}
        for prefix, mass in probs.items():
            logits = hf_logits(hf, PROMPT + list(prefix))[-1].double()
            for t in prefix:
                logits[t] -= FREQUENCY
            logits = logits / TEMPERATURE
            top = torch.topk(logits, TOP_K)
            p = torch.softmax(top.values, dim=-1)
            for t, pt in zip(top.indices.tolist(), p.tolist()):
                nxt[prefix + (t,)] = mass * pt
        probs = nxt
    return probs


def test_sampled_distribution_matches_the_target(models):
    target, hf, draft = models
    n = 2000
    llm = make_llm(target, max_num_seqs=256, speculative_config={
        "method": "draft_model", "model": str(draft), "num_speculative_tokens": 3, "max_batch_tokens": 1 << 20,
        "adaptive": False})
    outs = llm.generate([PROMPT] * n, [_params(seed) for seed in range(n)], use_tqdm=False)
    stats = llm.engine.stats()
    drafted, accepted = stats["spec_decode_num_draft_tokens"], stats["spec_decode_num_accepted_tokens"]
    print("drafted", drafted, "accepted", accepted)
    assert 0 < accepted < drafted  # both branches of the rule ran, many times
    assert drafted - accepted > 200 and accepted > 200
    ref = _reference(hf)
    counts = {seq: 0 for seq in ref}
    for out in outs:
        seq = tuple(out.outputs[0].token_ids)
        assert seq in counts  # nothing outside the target's top-k support
        counts[seq] += 1
    keys = sorted(ref)
    expected = [ref[k] * n for k in keys]
    # Sequences too rare to test on their own go into one bucket.
    small = [i for i, e in enumerate(expected) if e < 5]
    obs = [counts[k] for i, k in enumerate(keys) if i not in small] + ([sum(counts[keys[i]] for i in small)] if small else [])
    exp = [e for i, e in enumerate(expected) if i not in small] + ([sum(expected[i] for i in small)] if small else [])
    total = sum(exp)
    exp = [e * n / total for e in exp]
    assert chisquare(obs, exp).pvalue > 0.001
    assert_idle(llm.engine)


def test_seeded_requests_are_batch_and_speculation_invariant(models):
    target, _, draft = models
    conf = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3, "adaptive": False}
    params = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.3, max_tokens=20, ignore_eos=True,
                            seed=1234)
    plain = make_llm(target).generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    llm = make_llm(target, speculative_config=conf)
    alone = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    others = random_prompts(6, seed=9)
    batch = [SamplingParams(temperature=0.8, max_tokens=12, seed=s) for s in range(6)]
    mixed = llm.generate(others[:3] + [PROMPT] + others[3:], batch[:3] + [params] + batch[3:], use_tqdm=False)
    assert alone == plain == mixed[3].outputs[0].token_ids
    assert llm.engine.stats()["spec_decode_num_accepted_tokens"] > 0
    assert_idle(llm.engine)


class _Req:
    def __init__(self) -> None:
        self.params = SamplingParams(min_tokens=3, stop_token_ids=[9])
        self.prompt_token_ids, self.output_token_ids = [1, 2], [5]
        self.generator, self.eos_token_ids = None, (7,)


def test_verify_rows_see_the_drafts_before_them():
    rows = verify_rows(_Req(), [4, 6, 8])
    assert [r.output_token_ids for r in rows[1:]] == [[5, 4], [5, 4, 6], [5, 4, 6, 8]]
    # min_tokens 3: eos and stop ids stay banned until three output tokens precede the position.
    assert sorted(rows[1].banned_token_ids) == [7, 9] and rows[2].banned_token_ids == []
    assert "4" not in repr(rows[1]) and "5" not in repr(rows[1])


@pytest.mark.parametrize("targets,drafts,want", [
    ([3, 4, 5], [3, 4], 2), ([3, 9, 5], [3, 4], 1), ([8, 4, 5], [3, 4], 0), ([1], [], 0)])
def test_num_accepted_is_the_matching_prefix(targets, drafts, want):
    assert num_accepted(targets, drafts) == want
