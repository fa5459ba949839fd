"""Batched sampler: truncation distributions, seeds, greedy, penalties, banned tokens, logprobs."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from llmserve.sampling import Sampler, SamplingMetadata, SamplingRow, gather_logprobs
from llmserve.sampling_params import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture(params=["torch", "kernels"])
def sampler_kernels(request):
    """The sampler as plain torch and with llmserve's CPU kernels (sample_rows)."""
    if request.param == "torch":
        return None
    from llmserve.kernels import cpu_kernels

    k = cpu_kernels()
    if k is None:
        pytest.skip("llmserve's CPU kernels are unavailable here")
    return k
NUM_DRAWS = 20_000
SMALL_LOGITS = [2.0, 1.6, 1.2, 0.9, 0.5, 0.1, -0.4, -1.0]


def row(params: SamplingParams, prompt: list[int] | None = None, output: list[int] | None = None,
        banned: list[int] | None = None) -> SamplingRow:
    generator = None if params.seed is None else torch.Generator(device=CPU).manual_seed(params.seed)
    return SamplingRow(params=params, prompt_token_ids=prompt or [0], output_token_ids=output or [],
                       generator=generator, banned_token_ids=banned or [])


def meta_for(rows: list[SamplingRow], vocab_size: int) -> SamplingMetadata:
    return SamplingMetadata.from_rows(rows, vocab_size, CPU)


def expected_distribution(logits: list[float], temperature: float, top_k: int, top_p: float,
                          min_p: float) -> list[float]:
    """Reference: temperature, top-k, top-p, min-p, each renormalizing, in plain Python."""
    weights = [math.exp(x / temperature) for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = set(order[:top_k] if top_k else order)
    total = sum(weights[i] for i in keep)
    if top_p < 1.0:
        mass, kept = 0.0, set()
        for i in order:
            if i in keep and mass < top_p:
                kept.add(i)
                mass += weights[i] / total
        keep = kept
    top = max(weights[i] for i in keep)
    keep = {i for i in keep if weights[i] >= min_p * top}
    total = sum(weights[i] for i in keep)
    return [weights[i] / total if i in keep else 0.0 for i in range(len(logits))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p,min_p",
    [
        (1.0, 0, 1.0, 0.0),  # no truncation
        (1.0, 3, 1.0, 0.0),
        (1.0, 0, 0.75, 0.0),
        (1.0, 0, 1.0, 0.3),
        (0.6, 4, 1.0, 0.0),
        (1.7, 0, 0.8, 0.0),
        (0.5, 0, 1.0, 0.04),
        (1.3, 6, 0.85, 0.1),  # all three combined
    ],
)
def test_truncated_distribution_matches_reference(temperature, top_k, top_p, min_p, sampler_kernels):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    vocab = len(SMALL_LOGITS)
    logits = torch.tensor([SMALL_LOGITS] * NUM_DRAWS)
    tokens = Sampler(seed=0, kernels=sampler_kernels)(logits, meta_for([row(params)] * NUM_DRAWS, vocab)).token_ids

    expected = expected_distribution(SMALL_LOGITS, temperature, top_k, top_p, min_p)
    counts = torch.bincount(tokens, minlength=vocab).tolist()
    kept = [i for i in range(vocab) if expected[i] > 0]
    assert all(counts[i] == 0 for i in range(vocab) if expected[i] == 0), "a truncated token was drawn"
    observed = [counts[i] for i in kept]
    assert chisquare(observed, [expected[i] * NUM_DRAWS for i in kept]).pvalue > 0.001


def test_seeded_row_is_independent_of_batch(sampler_kernels):
    vocab, steps = 500, 6
    logits_seq = [torch.randn(1, vocab, generator=torch.Generator().manual_seed(s)) * 2 for s in range(steps)]
    seeded = SamplingParams(temperature=0.9, top_k=200, seed=1234)

    def run_alone() -> list[int]:
        r, sampler = row(seeded), Sampler(seed=1, kernels=sampler_kernels)
        return [int(sampler(lg, meta_for([r], vocab)).token_ids[0]) for lg in logits_seq]

    def run_in_batch(position: int, sampler_seed: int) -> list[int]:
        others = [
            SamplingParams(temperature=1.0, top_p=0.9, seed=7),
            SamplingParams(temperature=1.2),
            SamplingParams(temperature=0.0, logprobs=3),
            SamplingParams(temperature=0.7, min_p=0.1, repetition_penalty=1.3),
        ]
        rows = [row(others[i % len(others)]) for i in range(31)]
        target = row(seeded)
        rows.insert(position, target)
        sampler = Sampler(seed=sampler_seed, kernels=sampler_kernels)
        out = []
        for lg in logits_seq:
            batch = torch.randn(32, vocab) * 2
            batch[position] = lg[0]
            out.append(int(sampler(batch, meta_for(rows, vocab)).token_ids[position]))
        return out

    alone = run_alone()
    assert len(set(alone)) > 1  # the draws actually vary from step to step
    for position, sampler_seed in [(0, 2), (13, 3), (31, 4)]:
        assert run_in_batch(position, sampler_seed) == alone


def test_greedy_is_argmax_with_low_id_ties_and_bf16(sampler_kernels):
    logits = torch.randn(16, 300)
    logits[3, 10] = logits[3, 200] = logits[3].max() + 1.0  # tie: the lower id wins
    meta = meta_for([row(SamplingParams(temperature=0.0))] * 16, 300)
    tokens = Sampler(kernels=sampler_kernels)(logits, meta).token_ids
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert tokens[3] == 10
    bf16 = logits.to(torch.bfloat16)
    assert torch.equal(Sampler(kernels=sampler_kernels)(bf16, meta).token_ids, bf16.float().argmax(dim=-1))


def reference_penalties(logits: list[float], params: SamplingParams, prompt: list[int],
                        output: list[int]) -> list[float]:
    out = list(logits)
    for t in set(prompt + output):
        pen = params.repetition_penalty
        out[t] = out[t] / pen if out[t] > 0 else out[t] * pen
    for t, count in Counter(output).items():
        out[t] -= params.frequency_penalty * count + params.presence_penalty
    return out


def test_penalties_match_reference(sampler_kernels):
    vocab = 40
    gen = torch.Generator().manual_seed(5)
    cases = [
        SamplingParams(temperature=0.0, repetition_penalty=1.8),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.7),
        SamplingParams(temperature=1.0, repetition_penalty=0.6, frequency_penalty=-0.5, presence_penalty=1.2),
        SamplingParams(temperature=1.0),  # no penalty in a penalized batch
        SamplingParams(temperature=0.0, presence_penalty=-2.0),
    ]
    rows = [
        row(p, prompt=torch.randint(0, vocab, (12,), generator=gen).tolist(),
            output=torch.randint(0, vocab, (9,), generator=gen).tolist())
        for p in cases
    ]
    logits = torch.randn(len(rows), vocab, generator=gen) * 3
    original = logits.clone()
    meta = meta_for(rows, vocab)
    sampler = Sampler(seed=0, kernels=sampler_kernels)
    reference = torch.tensor([
        reference_penalties(logits[i].tolist(), r.params, r.prompt_token_ids, r.output_token_ids)
        for i, r in enumerate(rows)
    ])
    torch.testing.assert_close(sampler.compute_probs(logits, meta), torch.softmax(reference, dim=-1))
    tokens = sampler(logits, meta).token_ids
    for i, r in enumerate(rows):
        if r.params.greedy:
            assert tokens[i] == reference[i].argmax()
    assert torch.equal(logits, original)  # the caller's logits are untouched


def test_banned_tokens_never_sampled(sampler_kernels):
    vocab = len(SMALL_LOGITS)
    banned = [0, 1, 5]  # the two most likely tokens among them
    rows = [row(SamplingParams(temperature=1.0), banned=banned)] * 5000
    rows += [row(SamplingParams(temperature=0.0), banned=banned)]
    logits = torch.tensor([SMALL_LOGITS] * len(rows))
    tokens = Sampler(seed=0, kernels=sampler_kernels)(logits, meta_for(rows, vocab)).token_ids
    assert not set(tokens.tolist()) & set(banned)
    assert tokens[-1] == 2  # greedy falls to the best allowed token


def test_logprobs_are_raw_log_softmax_with_ranks_and_sorted_top(sampler_kernels):
    vocab, k = 64, 5
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(9)) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=k),
        SamplingParams(temperature=1.5, top_k=10, logprobs=2, repetition_penalty=1.5),
        SamplingParams(temperature=0.8, top_p=0.5, logprobs=0, seed=3),
        SamplingParams(temperature=1.0),  # asked for none: still gets the shared k columns
        SamplingParams(temperature=0.3, min_p=0.2, logprobs=k),
        SamplingParams(temperature=1.0, logprobs=1),
    ]
    rows = [row(p, prompt=[1, 2, 3], output=[4, 5]) for p in params]
    out = Sampler(seed=0, kernels=sampler_kernels)(logits, meta_for(rows, vocab))
    ref = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.shape == out.logprob_token_ids.shape == (6, 1 + k)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.logprob_token_ids))
    top = out.logprobs[:, 1:]
    assert torch.all(top[:, :-1] >= top[:, 1:])
    assert torch.equal(out.logprob_token_ids[:, 1:], ref.argsort(dim=-1, descending=True)[:, :k])
    for i in range(6):
        order = ref[i].argsort(descending=True).tolist()
        assert out.sampled_ranks[i] == order.index(int(out.token_ids[i])) + 1


def test_gather_logprobs_without_top():
    lp = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0]]), dim=-1)
    ids, values, ranks = gather_logprobs(lp, torch.tensor([2, 0]), 0)
    assert ids.tolist() == [[2], [0]]
    torch.testing.assert_close(values[:, 0], lp[[0, 1], [2, 0]])
    assert ranks.tolist() == [2, 1]


def test_mixed_batch_shapes_and_greedy_rows(sampler_kernels):
    vocab = 100
    logits = torch.randn(5, vocab)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9),
        SamplingParams(temperature=1.0, seed=42, logprobs=3),
        SamplingParams(temperature=0.0, logprobs=1, frequency_penalty=0.5),
        SamplingParams(temperature=1.1, min_p=0.05, seed=43),
    ]
    rows = [row(p, output=[7, 7, 8]) for p in params]
    out = Sampler(seed=0, kernels=sampler_kernels)(logits, meta_for(rows, vocab))
    assert out.token_ids.shape == (5,) and out.token_ids.dtype == torch.int64
    assert out.logprobs.shape == out.logprob_token_ids.shape == (5, 4)
    assert out.sampled_ranks.shape == (5,)
    assert out.token_ids[0] == logits[0].argmax()
    penalized = logits[3].clone()
    penalized[7] -= 1.0
    penalized[8] -= 0.5
    assert out.token_ids[3] == penalized.argmax()
    assert all(0 <= t < vocab for t in out.token_ids.tolist())


def test_all_greedy_fast_path_has_no_random_state(sampler_kernels):
    meta = meta_for([row(SamplingParams(temperature=0.0))] * 3, 10)
    assert meta.all_greedy and meta.no_penalties and meta.no_top_k and meta.no_top_p and meta.no_min_p
    assert meta.temperature is None and meta.max_num_logprobs is None
    out = Sampler(kernels=sampler_kernels)(torch.randn(3, 10), meta)
    assert out.logprobs is None and out.sampled_ranks is None
