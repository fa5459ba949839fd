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
    assert kernels.argmax_rows(logits, vec=vec).tolist() == [3, 90, 8, 0]
    wide = torch.randn(9, 49152)
    assert torch.equal(kernels.argmax_rows(wide, vec=vec), wide.argmax(dim=-1))


def truncated_weights(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Reference in float64: softmax weights at temperature, then top-k (logits >= the k-th largest),
    top-p (a token stays while the mass before it, most likely first and lower ids first among
    equals, is < top_p x total), min-p (weights >= min_p x the largest)."""
    y = logits.astype(np.float64) / temperature
    w = np.exp(y - y.max())
    if 0 < top_k < len(w):
        w[logits < np.sort(logits)[::-1][top_k - 1]] = 0.0
    if top_p < 1.0:
        order = np.lexsort((np.arange(len(w)), -w))
        before = np.cumsum(w[order]) - w[order]
        drop = order[before >= top_p * w.sum()]
        w[drop] = 0.0
    if min_p > 0.0:
        w[w < min_p * w.max()] = 0.0
    return w


@pytest.mark.parametrize("vec", PATHS)
@pytest.mark.parametrize("vocab,temperature,top_k,top_p,min_p", [
    (1000, 1.0, 50, 1.0, 0.0),
    (1000, 0.7, 0, 0.9, 0.0),
    (1000, 1.3, 0, 1.0, 0.05),
    (1000, 0.9, 100, 0.8, 0.02),
    (49152, 1.0, 0, 0.95, 0.0),  # a flat tail: the bin where the mass crosses holds many tokens
    (49152, 0.6, 40, 0.9, 0.1),
])
def test_truncation_matches_reference(kernels, vec, vocab, temperature, top_k, top_p, min_p):
    """One row's whole inverse CDF, probed at 3000 evenly spaced u: every truncated token's
    interval has width 0, every kept one its reference width."""
    rng = np.random.default_rng(vocab + top_k)
    logits = (rng.standard_normal(vocab) * 2).astype(np.float32)
    u = (np.arange(3000) + 0.5) / 3000
    batch = torch.from_numpy(np.tile(logits, (len(u), 1)))
    per_row = lambda v, dtype: torch.full((len(u),), v, dtype=dtype)
    _, sampled = kernels.sample_rows(batch, per_row(temperature, torch.float32), torch.from_numpy(u),
                                     per_row(top_k or vocab, torch.int64), per_row(top_p, torch.float32),
                                     per_row(min_p, torch.float32), vec=vec)
    weights = truncated_weights(logits, temperature, top_k, top_p, min_p)
    want, margin = reference(np.tile(weights, (len(u), 1)), u)
    clear = margin > 1e-6
    assert clear.sum() >= len(u) * 0.95
    assert np.array_equal(sampled.numpy()[clear], want[clear])
    assert np.all(weights[sampled.numpy()] > 0)


@pytest.mark.parametrize("vec", PATHS)
def test_top_p_among_equal_weights_keeps_the_lowest_ids(kernels, vec):
    logits = torch.full((3, 64), -30.0)
    logits[:, [5, 9, 40, 41]] = 4.0  # four equal leaders; the rest far below
    u = torch.tensor([0.0, 0.5, 1.0 - 2.0 ** -53], dtype=torch.float64)
    # top_p 0.45 keeps two leaders: the mass before the third is 2 of a total just over 4
    _, sampled = kernels.sample_rows(logits, torch.ones(3), u, None, torch.full((3,), 0.45), None, vec=vec)
    assert sampled.tolist() == [5, 9, 9]


@pytest.mark.parametrize("vec", PATHS)
def test_masked_tokens_are_never_drawn(kernels, vec):
    vocab, allowed = 300, [17, 18, 150, 263]
    u = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0 - 2.0 ** -53, 0.999999], dtype=torch.float64)
    logits = torch.full((len(u), vocab), float("-inf"))
    logits[:, allowed] = torch.tensor([0.5, -1.0, 2.0, 0.0])
    _, sampled = kernels.sample_rows(logits, torch.empty(0), u, vec=vec)
    assert set(sampled.tolist()) <= set(allowed)
    assert sampled[0] == allowed[0] and sampled[4] == allowed[-1]


def test_bad_input_is_refused(kernels):
    u = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        kernels.sample_rows(torch.zeros(2, 8, dtype=torch.float64), torch.empty(0), u)
    with pytest.raises(RuntimeError, match="u must be"):
        kernels.sample_rows(torch.zeros(2, 8), torch.empty(0), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="temperature"):
        kernels.sample_rows(torch.zeros(2, 8), torch.ones(3), u)
    with pytest.raises(RuntimeError, match="top_k"):
        kernels.sample_rows(torch.zeros(2, 8), torch.ones(2), u, torch.ones(2))  # float, not int64
