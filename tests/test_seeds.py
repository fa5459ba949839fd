"""Seeds (issue 9): a request's seed is refused exactly when torch cannot take it, and the sampler's
seed fixes the draws of unseeded rows (the engine passes it --seed: test_engine_core checks that
the same engine seed gives the same tokens)."""
from __future__ import annotations

import pytest
import torch
from server_fixtures import tiny_model_path
from tiny_models import make_llm

from llmserve.errors import InvalidRequestError
from llmserve.sampling.sampler import Sampler
from llmserve.sampling_params import MAX_SEED, MIN_SEED, SamplingParams

EDGES = [MIN_SEED - 1, MIN_SEED, -1, 0, 2**63, MAX_SEED - 1, MAX_SEED, MAX_SEED + 1, 2**80]
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def torch_takes(seed: int) -> bool:
    try:
        torch.Generator().manual_seed(seed)
        return True
    except (ValueError, RuntimeError, OverflowError, TypeError):
        return False


@pytest.mark.parametrize("seed", EDGES)
def test_a_seed_is_refused_exactly_when_torch_refuses_it(seed):
    if torch_takes(seed):
        assert SamplingParams(seed=seed).seed == seed
    else:
        with pytest.raises(InvalidRequestError, match="^seed must be an integer in "):
            SamplingParams(seed=seed)


def test_every_sequence_seed_must_fit():
    # Sequence i of n draws with seed + i.
    assert torch_takes(MAX_SEED - 1 + 1) and not torch_takes(MAX_SEED + 1)
    SamplingParams(n=2, seed=MAX_SEED - 1)
    with pytest.raises(InvalidRequestError, match="^seed "):
        SamplingParams(n=2, seed=MAX_SEED)
    with pytest.raises(InvalidRequestError, match="^seed "):
        SamplingParams(n=16, seed=MAX_SEED - 14)
    SamplingParams(n=16, seed=MIN_SEED)
    for not_an_int in (True, 1.0, "7"):
        with pytest.raises(InvalidRequestError, match="^seed must be an integer$"):
            SamplingParams(seed=not_an_int)


@pytest.fixture(scope="module")
def llm():
    return make_llm(tiny_model_path())


def test_the_offline_api_refuses_a_seed_torch_cannot_take(llm):
    params = SamplingParams(temperature=1.0, max_tokens=2)
    params.seed = 2**64  # changed after construction: generate() checks again
    with pytest.raises(InvalidRequestError, match="^seed "):
        llm.generate(PROMPTS, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    outs = llm.generate(PROMPTS[:1], SamplingParams(n=2, seed=MAX_SEED - 1, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    assert [len(c.token_ids) for c in outs[0].outputs] == [3, 3]


def test_the_samplers_seed_fixes_its_shared_draws():
    def draws(seed: int | None) -> list[float]:
        gen = Sampler(seed)._shared_generator(torch.device("cpu"))
        return torch.empty(64).exponential_(generator=gen).tolist()

    assert draws(7) == draws(7) != draws(8)
    assert draws(MAX_SEED) == draws(-1)  # torch reads a negative seed as its two's complement
    for bad in (MAX_SEED + 1, MIN_SEED - 1, True):
        with pytest.raises(ValueError):
            Sampler(bad)


def test_engine_seed_outside_torchs_range_is_a_typed_error():
    from llmserve.config import EngineConfig

    with pytest.raises(InvalidRequestError):
        EngineConfig(seed=1 << 64)
    assert EngineConfig(seed=(1 << 64) - 1).seed == (1 << 64) - 1
