"""The server in private mode: privileged endpoints gone, metrics an allow-list, a token per
generation request, requests through Oblivious HTTP (streamed too), per-client prefix isolation,
and refusals of flags that would weaken it."""
from __future__ import annotations

import json

import httpx
import pytest

from llmserve.config import EngineConfig
from llmserve.errors import InvalidRequestError
from llmserve.privacy.client import ObliviousClient
from llmserve.privacy.gateway import WELL_KNOWN
from llmserve.privacy.ohttp import parse_key_configs
from llmserve.privacy.privacypass import (
    Issuer,
    TokenChallenge,
    authorization_header,
    create_token_request,
    finalize_token,
)
from llmserve.privacy.threats import private_config
from llmserve.server.private import PrivacyOptions
from server_fixtures import start_private_server, tiny_model_path

ISSUER = Issuer("issuer.test", rate=1000)
LONG_PROMPT = "Paris is the capital of France, and Berlin is the capital of Germany. " * 6


@pytest.fixture(scope="module")
def node():
    config = private_config(EngineConfig(model=str(tiny_model_path()), num_kv_blocks=256, max_num_batched_tokens=64))
    url, _, private, app, stop = start_private_server(
        config, PrivacyOptions(issuer_keys=[ISSUER.public_key], issuer_name="issuer.test"))
    private.test_app = app
    yield url, private
    stop()


def _token() -> str:
    state = create_token_request(TokenChallenge("issuer.test"), ISSUER.public_key)
    return authorization_header(finalize_token(state, ISSUER.public_key, ISSUER.issue(state.request, "test")))


def _complete(url, prompt, token, **extra):
    return httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra},
                      headers={"authorization": token} if token else {}, timeout=60)


def test_privileged_endpoints_are_gone_and_metrics_are_an_allow_list(node):
    url, _ = node
    for path in ("/tokenize", "/detokenize"):
        assert httpx.post(url + path, json={"prompt": "x"}).status_code == 404
    doc = httpx.get(url + "/v1/privacy").json()
    assert doc["private"] and doc["tokens_required"]
    states = {o["optimization"]: o["state"] for o in doc["optimizations"]}
    assert states["wipe_kv_on_free"] is True and states["speculative_config"] is None
    assert httpx.get(url + "/v1/privacy/manifest").status_code == 404  # started without one
    metrics = httpx.get(url + "/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines() if line and not line.startswith("#")}
    assert names and all(n.startswith("llmserve:") for n in names)
    assert not any(n.startswith(("python_", "process_")) for n in names)


def test_a_token_per_request(node):
    url, _ = node
    refused = _complete(url, "hello", None)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith('PrivateToken challenge="')
    assert refused.json()["error"]["code"] == "token_required"
    token = _token()
    assert _complete(url, "hello", token).status_code == 200
    assert _complete(url, "hello", token).status_code == 401  # spent


def test_prefixes_are_not_shared_between_clients_unless_they_share_a_salt(node):
    url, _ = node

    def cached(**extra):
        return _complete(url, LONG_PROMPT, _token(), **extra).json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    cached()
    assert cached() == 0  # another request without a salt: a fresh random salt, no hit
    cached(cache_salt="my-own-secret")
    assert cached(cache_salt="my-own-secret") > 0  # one client reusing its own prefix


def test_through_oblivious_http_whole_and_streamed(node):
    url, private = node
    config = parse_key_configs(httpx.get(url + WELL_KNOWN).content)[0]
    assert config.key_id in private.gateway.keys
    client = ObliviousClient(url + WELL_KNOWN, config)  # no relay here: the relay has its own test
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    status, _, answer = client.request("POST", "/v1/chat/completions", body.encode(), {"authorization": _token()})
    assert status == 200 and json.loads(answer)["choices"][0]["message"]["role"] == "assistant"
    stream_body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "stream": True}).encode()
    items = list(client.stream("POST", "/v1/chat/completions", stream_body, {"authorization": _token()}))
    assert items[0][0] == 200
    text = b"".join(items[1:]).decode()
    assert text.count("data: ") >= 3 and text.rstrip().endswith("data: [DONE]")
    status, _, _ = client.request("POST", "/v1/chat/completions", body.encode())  # no token inside
    assert status == 401


def test_unsafe_flags_are_refused():
    from llmserve.server.cli import refuse_unsafe_private_flags

    class Args:
        log_level, allowed_origins, manifest, transparency_log = "debug", [], None, None
    with pytest.raises(InvalidRequestError, match="--log-level debug"):
        refuse_unsafe_private_flags(Args)
    Args.log_level, Args.allowed_origins = None, ["https://example.com"]
    with pytest.raises(InvalidRequestError, match="--allowed-origins"):
        refuse_unsafe_private_flags(Args)
    with pytest.raises(InvalidRequestError, match="scheduling_policy"):
        private_config(EngineConfig(scheduling_policy="deadline"))


def test_every_endpoint_of_the_private_app_is_accounted_for(node):
    url, private = node
    from llmserve.server.private import FORBIDDEN_PATHS

    app_paths = {getattr(r, "path", None) for r in private.test_app.router.routes}
    # What a private node serves; a route added to the app without a decision here fails this test.
    allowed = {"/", "/static", "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
               "/metrics", "/openapi.json", "/v1/privacy", "/v1/privacy/manifest"}
    assert app_paths - allowed == set(), app_paths - allowed
    assert not app_paths & FORBIDDEN_PATHS
    for path in sorted(FORBIDDEN_PATHS):
        assert httpx.get(url + path).status_code == 404
        assert httpx.post(url + path, json={}).status_code in (404, 405)
    # Settings are frozen: the engine config cannot be changed after start.
    with pytest.raises(Exception):
        private.config.seed = 1

