"""LLM.generate / LLM.chat interrupted while stepping (issue 9): the requests of the interrupted call
leave the engine (no KV blocks held, nothing computed by the next call)."""
from __future__ import annotations

import pytest
from server_fixtures import tiny_model_path
from tiny_models import make_llm

from llmserve.errors import InvalidRequestError
from llmserve.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PARAMS = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return make_llm(tiny_model_path())


def interrupt_after(llm, monkeypatch, steps: int, error: BaseException) -> None:
    real_step, calls = llm.engine.step, []

    def step():
        calls.append(1)
        if len(calls) > steps:
            raise error
        return real_step()

    monkeypatch.setattr(llm.engine, "step", step)


def assert_engine_empty(llm) -> None:
    stats = llm.engine.stats()
    assert not llm.engine.has_unfinished_requests()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_usage"]) == (0, 0, 0.0)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl-c", "error"])
def test_an_interrupted_generate_leaves_nothing_behind(llm, monkeypatch, error):
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[1:], PARAMS, use_tqdm=False)]
    interrupt_after(llm, monkeypatch, 4, error)
    with pytest.raises(type(error)):
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    monkeypatch.undo()
    assert_engine_empty(llm)
    outs = llm.generate(PROMPTS[1:], PARAMS, use_tqdm=False)  # only its own prompts, computed as before
    assert [o.prompt_token_ids for o in outs] == PROMPTS[1:]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_engine_empty(llm)


def test_an_interrupted_chat_leaves_nothing_behind(llm, monkeypatch):
    expected = llm.chat(CHAT, PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    interrupt_after(llm, monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        llm.chat([CHAT, CHAT], PARAMS, use_tqdm=False)
    monkeypatch.undo()
    assert_engine_empty(llm)
    outs = llm.chat(CHAT, PARAMS, use_tqdm=False)
    assert len(outs) == 1 and outs[0].outputs[0].token_ids == expected


def test_a_bad_prompt_in_a_batch_leaves_nothing_behind(llm):
    with pytest.raises(InvalidRequestError):
        llm.generate([PROMPTS[0], [1, 10**6]], PARAMS, use_tqdm=False)
    assert_engine_empty(llm)
