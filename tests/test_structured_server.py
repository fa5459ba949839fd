"""Structured outputs through the server with the official `openai` client and the embedded model
(SmolLM2-135M): response_format json_schema / json_object, vLLM's structured_outputs and guided_*
on both endpoints, and a 400 that says why for a spec that does not compile."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from server_fixtures import start_server

from llmserve.model.default_model import default_model_path


def _default_model_available() -> bool:
    try:
        default_model_path()
        return True
    except Exception:  # noqa: BLE001 - not installed
        return False


pytestmark = pytest.mark.skipif(not _default_model_available(), reason="the default model is not installed")

SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30},
                       "address": {"type": "object",
                                   "properties": {"city": {"type": "string", "maxLength": 30},
                                                  "country": {"type": "string", "maxLength": 30}},
                                   "required": ["city", "country"]}},
        "required": ["name", "address"],
    },
    "enum": {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                       "score": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["sentiment", "score"],
    },
    "array": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"type": "string", "maxLength": 15},
                                  "minItems": 1, "maxItems": 4}},
        "required": ["colors"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"tasks": {"type": "array", "maxItems": 3,
                                 "items": {"type": "object",
                                           "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                                                          "done": {"type": "boolean"}},
                                           "required": ["id", "done"], "additionalProperties": False}}},
        "required": ["tasks"],
        "additionalProperties": False,
    },
}
PROMPTS = {
    "nested_object": "Give a person's name and address as JSON.",
    "enum": "Classify the sentiment of 'I love this!' as JSON.",
    "array": "List some colors of the rainbow as JSON.",
    "array_of_objects": "Give a to-do list as JSON.",
}


@pytest.fixture(scope="module")
def server():
    srv = start_server(None, served_model_name="smollm2")
    yield srv
    srv.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)


def test_json_schema_batch_validates(client):
    def ask(name: str):
        return name, client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": PROMPTS[name]}], temperature=0, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name],
                                                                      "strict": True}})

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # at once: one engine batch with several grammars
        results = list(pool.map(ask, SCHEMAS))
    for name, r in results:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", name
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_schema_sampled_n2_and_streamed(client):
    schema = SCHEMAS["enum"]
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    msgs = [{"role": "user", "content": PROMPTS["enum"]}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, n=2, seed=7, temperature=1.0,
                                       max_tokens=100, response_format=fmt)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    stream = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=100,
                                            response_format=fmt, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), schema)


def test_json_object(client):
    msgs = [{"role": "user", "content": "Give a person's name and age as a JSON object."}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0, max_tokens=200,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


@pytest.mark.parametrize(("extra", "check"), [
    ({"guided_regex": r"[0-9]{2}-[A-Z]{2}"}, lambda t: re.fullmatch(r"[0-9]{2}-[A-Z]{2}", t)),
    ({"guided_choice": ["Paris", "London", "Rome"]}, lambda t: t in ("Paris", "London", "Rome")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_json": SCHEMAS["enum"]}, lambda t: jsonschema.validate(json.loads(t), SCHEMAS["enum"]) is None),
    ({"guided_grammar": 'start: "The answer is " ("A" | "B")'}, lambda t: t in ("The answer is A", "The answer is B")),
])
def test_vllm_extras_on_completions_and_chat(client, extra, check):
    c = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=60,
                                  extra_body=extra)
    assert check(c.choices[0].text) and c.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Answer."}],
                                       temperature=0, max_tokens=60, extra_body=extra)
    assert check(r.choices[0].message.content)


@pytest.mark.parametrize(("body", "param", "reason"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"guided_regex": "[0-9"}, "guided_regex", "unclosed"),
    ({"structured_outputs": {"grammar": "start: (("}}, "structured_outputs", ""),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
])
def test_bad_specs_are_400_that_say_why(server, body, param, reason):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert reason.lower() in err["message"].lower()
    ok = httpx.post(server.base_url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200  # the server goes on


def test_grammars_compile_off_the_engine_thread_once_per_spec(server, client, monkeypatch):
    import threading

    grammars = server.engine.engine.grammars
    threads = []
    real = grammars._compile

    def spy(so):
        threads.append(threading.current_thread().name)
        return real(so)

    monkeypatch.setattr(grammars, "_compile", spy)
    for _ in range(2):
        c = client.completions.create(model="smollm2", prompt="Pick:", max_tokens=10, temperature=0,
                                      extra_body={"guided_regex": "(left|right) 4[0-9]"})
        assert re.fullmatch("(left|right) 4[0-9]", c.choices[0].text)
    assert threads == ["llmserve-grammar_0"]  # compiled once, on the grammar thread; the loop found it cached
    assert repr(grammars).startswith("GrammarCompiler(") and "left" not in repr(grammars)
