"""/openapi.json: generated from the protocol models, it documents every route, and what the
server accepts and returns matches it (a bounded schemathesis run, then streams and errors by hand)."""
from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode

# The schema states types and shapes; ranges (temperature >= 0, n <= 16) and the context length
# are checked by the server and answered with the documented 400, so a schema-valid request may be
# refused: schemathesis' check that every schema-valid request is accepted does not apply.
from schemathesis.specs.openapi.checks import positive_data_acceptance
from server_fixtures import start_server, tiny_model_path, wait_until

API_KEY = "openapi-key"
MAX_EXAMPLES = 12  # per operation: the whole run stays well under a minute on 2 cores


@pytest.fixture(scope="module")
def server():
    # A short context and a small queue keep every generated request cheap: at most 64 tokens, and
    # a batch of many prompts x n is refused (400) rather than run.
    srv = start_server(tiny_model_path(), api_key=API_KEY, num_kv_blocks=256, max_model_len=64,
                       max_waiting_requests=32)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def doc(server) -> dict:
    r = httpx.get(server.base_url + "/openapi.json")  # open, like /health: no key needed
    assert r.status_code == 200
    return r.json()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_server_does_what_its_schema_says(server, mode):
    """Schemathesis-generated requests for every operation, valid ones and (negative) invalid ones:
    no 5xx, statuses and content types as documented, bodies (errors too) valid against the schema,
    and invalid bodies refused with a 4xx. Driven through Hypothesis directly: schemathesis' pytest
    plugin does not run under pytest 9."""
    api = schemathesis.openapi.from_url(server.base_url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        if mode == "negative" and not len(operation.body):
            continue  # a GET without parameters has nothing to get wrong
        run_operation(operation, GenerationMode(mode))
    assert wait_until(lambda: server.engine.stats().kv_usage == 0.0)


def run_operation(operation, mode: GenerationMode) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              phases=[Phase.explicit, Phase.generate])
    def check(case) -> None:
        case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                               excluded_checks=[positive_data_acceptance])

    check()


def validator(doc: dict, name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": doc["components"]})


def test_every_route_is_documented_from_its_models(server, doc):
    from fastapi.routing import APIRoute

    from llmserve.server.protocol import ChatCompletionRequest, CompletionRequest

    app = server.server.config.app
    routes = {(r.path, m.lower()) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema
              for m in r.methods - {"HEAD"}}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert routes == documented and ("/v1/chat/completions", "post") in documented
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    for component in schemas.values():  # each is a valid JSON Schema (2020-12, as OpenAPI 3.1 uses)
        Draft202012Validator.check_schema(component)
    for model in (CompletionRequest, ChatCompletionRequest):  # every field, as the model declares it
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]) >= {"200", "400", "401", "404", "413", "415", "429", "500", "503"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["429"]["headers"]["Retry-After"]
    assert chat["security"] == [{"bearer": []}] and "bearer" in doc["components"]["securitySchemes"]
    assert "security" not in doc["paths"]["/health"]["get"]  # health, readiness and metrics stay open


def test_streamed_events_and_errors_match_the_schema(server, doc):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    chunk, completion, error = (validator(doc, n) for n in ("ChatCompletionChunk", "CompletionResponse", "ErrorBody"))
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "n": 2, "logprobs": True, "top_logprobs": 2}
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and len(events) > 3
        for e in events[:-1]:
            chunk.validate(json.loads(e))
        r = http.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3, "stream": True, "logprobs": 1})
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        for e in events[:-1]:
            completion.validate(json.loads(e))
        for status, r in ((400, http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1000})),
                          (404, http.post("/v1/completions", json={"prompt": "hi", "model": "nope"})),
                          (415, http.post("/v1/completions", content=b"{}", headers={"content-type": "text/plain"})),
                          (401, httpx.get(server.base_url + "/v1/models"))):
            assert r.status_code == status
            error.validate(r.json())
    assert wait_until(lambda: server.engine.stats().kv_usage == 0.0)
