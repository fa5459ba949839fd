"""Speculative decoding's configuration (vLLM's shape, typed errors), the n-gram lookup, and how
many tokens a request drafts (its acceptance, the load, its limits)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from llmserve.cli import build_parser, engine_kwargs
from llmserve.config import EngineConfig
from llmserve.engine.request import Request
from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams
from llmserve.spec.config import SpeculativeConfig
from llmserve.spec.ngram import NgramProposer, ngram_draft
from tiny_models import llama_config, make_llm, make_model_folder, qwen2_config


def test_config_from_a_dict_or_json():
    conf = EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    assert conf.speculative_config == SpeculativeConfig("ngram", 3)
    again = EngineConfig(speculative_config=json.dumps({"method": "self_quantized", "quantization": "q4_1"}))
    assert again.speculative_config.quantization == "q4_1"
    assert EngineConfig().speculative_config is None


@pytest.mark.parametrize("value,message", [
    ('{"method": "ngram"', "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ({"method": "medusa"}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "num_speculative_tokens"),
    ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 3}, "prompt_lookup_max"),
    ({"method": "ngram", "speculative_tokens": 3}, "unknown field"),
    ({"method": "draft_model"}, "needs a model"),
    ({"method": "ngram", "model": "x"}, "applies to method draft_model"),
    ({"method": "self_quantized", "quantization": "int8"}, "quantization"),
    ({"method": "self_early_exit", "num_layers": 0}, "num_layers"),
])
def test_bad_configs_are_typed_errors_that_name_the_field(value, message):
    with pytest.raises(InvalidRequestError, match=message):
        EngineConfig(speculative_config=value)


def test_cli_flag():
    args = build_parser().parse_args(["generate", "hi", "--speculative-config", '{"method": "ngram"}'])
    assert EngineConfig(**engine_kwargs(args)).speculative_config.method == "ngram"
    plain = build_parser().parse_args(["generate", "hi"])
    assert engine_kwargs(plain)["speculative_config"] is None


def test_model_drafts_that_cannot_be_built_are_refused(tmp_path):
    folder = tmp_path / "t"
    make_model_folder(folder, llama_config())
    with pytest.raises(InvalidRequestError, match="below the target's 2 layers"):
        make_llm(folder, speculative_config={"method": "self_early_exit", "num_layers": 2})
    small = tmp_path / "small-vocab"
    make_model_folder(small, qwen2_config(vocab_size=200))
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        make_llm(folder, speculative_config={"method": "draft_model", "model": str(small)})


@pytest.mark.parametrize("tokens,k,want", [
    ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),  # the suffix "1 2" occurred before: what followed it
    ([1, 2, 3, 9, 2, 3, 7, 2, 3], 2, [7, 2]),  # the latest earlier occurrence wins
    ([5, 6, 7], 2, []),  # nothing repeats
    ([1, 2, 3, 1, 2, 3], 8, [1, 2, 3, 1, 2, 3, 1, 2]),  # the match runs into the end: the period-3 cycle goes on
    ([4, 9, 7, 7, 7], 4, [7, 7, 7, 7]),  # a one-token loop drafts k tokens, not one
    ([4, 9, 7, 8, 9, 7, 8], 5, [9, 7, 8, 9, 7]),  # "9 7 8" repeats: period 3
    ([1, 2, 3, 4, 5, 6, 1, 2], 3, [3, 4, 5]),  # enough follows: no cycling
])
def test_ngram_lookup(tokens, k, want):
    assert ngram_draft(np.asarray(tokens), k, 1, 3) == want


def _req(acceptance: float, max_tokens: int = 100, outputs: int = 1) -> Request:
    req = Request("r", [1, 2, 3], SamplingParams(), max_tokens, max_model_len=1000,
                  output_token_ids=[4] * outputs)
    req.spec_acceptance = acceptance
    return req


def test_draft_length_follows_acceptance_load_and_limits():
    proposer = NgramProposer(SpeculativeConfig("ngram", 5, max_batch_tokens=12), "cpu")
    assert proposer.draft_lengths([_req(1.0)], 1) == [5]
    assert proposer.draft_lengths([_req(0.7)], 1) == [4]  # 0.7^4 >= 0.2 > 0.7^5
    assert proposer.draft_lengths([_req(0.3)], 1) == [1]  # poor acceptance: probe with one token
    hopeless = _req(0.05)
    assert proposer.draft_lengths([hopeless], 1) == [0]  # none at all, until the estimate recovers
    for _ in range(15):
        proposer.draft_lengths([hopeless], 1)
    assert proposer.draft_lengths([hopeless], 1) == [1]
    # Load: 12 tokens for the decodes of 8 running requests and their drafts leave 4 to draft.
    assert proposer.draft_lengths([_req(1.0), _req(1.0)], 8) == [4, 0]
    assert proposer.draft_lengths([_req(1.0)], 12) == [0]
    # Never past max_tokens: the last token is the target's own.
    assert proposer.draft_lengths([_req(1.0, max_tokens=4, outputs=2)], 1) == [1]
    fixed = NgramProposer(SpeculativeConfig("ngram", 5, adaptive=False), "cpu")
    assert fixed.draft_lengths([_req(0.1)], 1) == [5]


def test_draft_cost_follows_measured_step_times():
    from llmserve.spec.cost import StepCostModel

    cost = StepCostModel(fallback=0.2)
    assert cost.threshold(1) == 0.2  # nothing measured yet
    for tokens in [1, 5, 1, 5, 64, 1, 5, 1, 5, 200]:  # steps cost 10 ms + 0.5 ms a token
        cost.observe_step(tokens, 0.010 + 0.0005 * tokens)
    assert cost.a == pytest.approx(0.010) and cost.b == pytest.approx(0.0005)
    # One stream: a draft token costs 0.5 ms of a 10.5 ms step.
    assert cost.threshold(1) == pytest.approx(0.0005 / 0.0105)
    # Sixty-four streams: the step is mostly per-token work, a draft token must nearly surely pay.
    assert cost.threshold(64) == pytest.approx(64 * 0.0005 / 0.042)
    cost.observe_drafting(4, 0.004)  # a slow draft: 1 ms a token, smoothed in
    assert cost.threshold(1) > 0.0005 / 0.0105
    proposer = NgramProposer(SpeculativeConfig("ngram", 5), "cpu")
    proposer.cost = cost
    assert proposer.draft_lengths([_req(0.9)], 1) == [5]
    assert proposer.draft_lengths([_req(0.9) for _ in range(4)], 4) == [5, 5, 5, 5]
    full = NgramProposer(SpeculativeConfig("ngram", 5, max_batch_tokens=10 ** 6), "cpu")
    full.cost = cost
    assert full.draft_lengths([_req(0.6) for _ in range(64)], 64) == [0] * 64
