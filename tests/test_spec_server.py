"""Speculative decoding behind the HTTP server: streamed and whole answers are the model's own, and
/metrics counts drafts, draft tokens and accepted tokens (vLLM's names, llmserve: prefix)."""
from __future__ import annotations

import json

import httpx
import pytest

from llmserve.sampling_params import SamplingParams
from server_fixtures import start_server, tiny_model_path, wait_until
from test_server import metric, sse_events
from tiny_models import make_llm

PROMPT = "one two three four five one two three four five one two three"
COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")


@pytest.fixture(scope="module")
def server():
    srv = start_server(tiny_model_path(), speculative_config={"method": "ngram", "prompt_lookup_min": 1, "adaptive": False},
                       num_kv_blocks=64)
    yield srv
    srv.stop()


def test_answers_are_the_models_own_and_metrics_count_drafts(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        before = http.get("/metrics").text
        whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
        streamed = "".join(json.loads(e)["choices"][0]["text"] for e in events)
        assert wait_until(lambda: server.engine.stats().num_running == 0)
        after = http.get("/metrics").text
    want = make_llm(tiny_model_path()).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    assert whole == streamed == want
    moved = {name: metric(after, f"llmserve:{name}_total") - metric(before, f"llmserve:{name}_total")
             for name in COUNTERS}
    assert moved["spec_decode_num_drafts"] > 0
    assert 0 < moved["spec_decode_num_accepted_tokens"] <= moved["spec_decode_num_draft_tokens"]
