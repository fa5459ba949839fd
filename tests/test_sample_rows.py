"""The sampler's CPU kernel (sample_rows) against a float64 reference, on both its code paths."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PATHS = [True, False]  # the vector code (where the build has AVX2) and the portable one


def reference(weights: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse CDF in float64: the first index whose cumulative weight exceeds u * total; and each
    target's distance to the nearest cumulative boundary, relative to the total."""
    cdf = np.cumsum(weights, axis=1)
    total = cdf[:, -1:]
    target = u[:, None] * total
    ids = np.array([np.searchsorted(c, t, side="right") for c, t in zip(cdf, target[:, 0])])
    margin = np.min(np.abs(cdf - target), axis=1) / total[:, 0]
    return ids, margin


@pytest.mark.parametrize("vec", PATHS)
@pytest.mark.parametrize("vocab", [5, 64, 1003, 49152])
def test_samples_softmax_at_temperature(kernels, vec, vocab):
    rng = np.random.default_rng(vocab)
    rows = 41
    logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    temperature = rng.uniform(0.3, 2.0, rows).astype(np.float32)
    u = rng.random(rows)
    argmax, sampled = kernels.sample_rows(torch.from_numpy(logits), torch.from_numpy(temperature),
                                          torch.from_numpy(u), vec=vec)
    scaled = logits.astype(np.float64) / temperature[:, None]
    weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    want, margin = reference(weights, u)
    clear = margin > 1e-6  # float32 weights (and x / T rounded) may move a boundary by ~1e-7 of the total
    assert clear.sum() >= rows * 0.9
    assert np.array_equal(sampled.numpy()[clear], want[clear])
    assert np.array_equal(argmax.numpy(), logits.argmax(axis=1))


@pytest.mark.parametrize("vec", PATHS)
def test_argmax_ties_go_to_the_lowest_index(kernels, vec):
    logits = torch.zeros(4, 100)
    logits[0, [3, 11, 97]] = 5.0  # other lanes of the vector code, and the scalar tail
    logits[1, [90, 98]] = 5.0
    logits[2, [8, 16, 24]] = 5.0  # the same lane, later groups
    logits[3] = -1.0  # all equal
    argmax, _ = kernels.sample_rows(logits, torch.empty(0), torch.zeros(4, dtype=torch.float64), vec=vec)
    assert argmax.tolist() == [3, 90, 8, 0]


@pytest.mark.parametrize("vec", PATHS)
@pytest.mark.parametrize("from_probs", [False, True])
def test_masked_tokens_are_never_drawn(kernels, vec, from_probs):
    vocab, allowed = 300, [17, 18, 150, 263]
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 2.0 ** -53, 0.999999], dtype=torch.float64)
    logits = torch.full((len(u), vocab), float("-inf"))
    logits[:, allowed] = torch.tensor([0.5, -1.0, 2.0, 0.0])
    rows = torch.softmax(logits, dim=-1) if from_probs else logits
    _, sampled = kernels.sample_rows(rows, torch.empty(0), u, from_probs=from_probs, vec=vec)
    assert set(sampled.tolist()) <= set(allowed)
    assert sampled[0] == allowed[0] and sampled[4] == allowed[-1]


@pytest.mark.parametrize("vec", PATHS)
def test_weights_given_as_probabilities(kernels, vec):
    rng = np.random.default_rng(3)
    weights = rng.random((29, 777)).astype(np.float32)
    weights[weights < 0.6] = 0.0  # truncated entries
    u = rng.random(29)
    _, sampled = kernels.sample_rows(torch.from_numpy(weights), torch.empty(0), torch.from_numpy(u),
                                     from_probs=True, vec=vec)
    want, margin = reference(weights.astype(np.float64), u)
    clear = margin > 1e-9
    assert clear.sum() >= 25 and np.array_equal(sampled.numpy()[clear], want[clear])
    assert all(weights[i, t] > 0 for i, t in enumerate(sampled.tolist()))


def test_bad_input_is_refused(kernels):
    u = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.sample_rows(torch.zeros(2, 8, dtype=torch.float64), torch.empty(0), u)
    with pytest.raises(RuntimeError, match="u must be"):
        kernels.sample_rows(torch.zeros(2, 8), torch.empty(0), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="temperature"):
        kernels.sample_rows(torch.zeros(2, 8), torch.ones(3), u)
