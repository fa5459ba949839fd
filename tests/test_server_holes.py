"""The holes a probe of the server found, one test each: huge text prompts, requests that can
never be admitted, non-JSON POSTs and CORS, a dropped non-streamed batch, readiness while
draining, and the API key from the environment."""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import free_port, start_server, tiny_model_path, wait_until

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    srv = start_server(tiny_model_path(), num_kv_blocks=512)
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c


def idle(srv) -> bool:
    s = srv.engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_usage == 0.0


def metric(text: str, name: str, **labels: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def tokenization(server):
    return server.server.config.app.state.ctx.tokenization


class GatedTokenizer:
    """Delegates to a tokenizer; counts encode calls and, when `gate` is given, holds each encode
    until the gate opens."""

    def __init__(self, inner, gate: threading.Event | None = None) -> None:
        self._inner = inner
        self.gate = gate
        self.entered = threading.Event()
        self.encodes = 0

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode(self, *args, **kwargs):
        self.encodes += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=60)
        return self._inner.encode(*args, **kwargs)


# ---- a huge text prompt ------------------------------------------------------------------------
def test_a_huge_text_is_refused_before_it_is_tokenized(server, http, monkeypatch):
    tok = tokenization(server)
    short, long = GatedTokenizer(tok._tokenizer), GatedTokenizer(tok._long_tokenizer)
    monkeypatch.setattr(tok, "_tokenizer", short)
    monkeypatch.setattr(tok, "_long_tokenizer", long)
    huge = "word " * (3 << 20)  # 15 MiB
    cases = [("/v1/completions", {"prompt": huge}, "prompt"),
             ("/v1/completions", {"prompt": ["hi", huge]}, "prompt"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]}, "messages"),
             ("/tokenize", {"prompt": huge}, "prompt")]
    for path, body, param in cases:
        r = http.post(path, json=body)
        assert r.status_code == 400, path
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (param, "context_length_exceeded")
        assert "maximum context length is 512 tokens" in err["message"] and "characters" in err["message"]
    assert short.encodes == 0 and long.encodes == 0  # refused by its length alone
    # The bound is the context times the longest token: a text just under it is tokenized, then
    # refused by its token count (or served, had it fitted).
    assert tok.max_chars == 512 * max(map(len, tok._tokenizer.get_vocab()))
    r = http.post("/v1/completions", json={"prompt": "a" * tok.max_chars})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert long.encodes == 1


def test_a_long_prompt_being_tokenized_does_not_hold_up_short_requests(server, http, monkeypatch):
    tok = tokenization(server)
    gate = threading.Event()
    long = GatedTokenizer(tok._long_tokenizer, gate)
    monkeypatch.setattr(tok, "_long_tokenizer", long)
    text = "The quick brown fox. " * 250  # over the long-lane threshold, under the size bound
    assert tok.long_text_chars < len(text) <= tok.max_chars
    results: dict[str, int] = {}
    slow = threading.Thread(target=lambda: results.update(
        long=http.post("/v1/completions", json={"prompt": text, "max_tokens": 1}).status_code))
    slow.start()
    try:
        assert long.entered.wait(timeout=30)  # the long prompt is being tokenized, and stays so
        r = http.post("/v1/chat/completions", json={"messages": MSG, "max_tokens": 3, "ignore_eos": True},
                      timeout=20)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert http.post("/tokenize", json={"prompt": "Hello world"}, timeout=20).status_code == 200
        assert slow.is_alive()  # the short requests were answered while the long one still waited
    finally:
        gate.set()
        slow.join(timeout=30)
    assert results["long"] in (200, 400)  # whichever its token count decides


# ---- more sequences than can ever wait -----------------------------------------------------------
def test_a_request_that_can_never_be_admitted_is_a_400_not_a_429(server, http):
    bound = server.engine.max_waiting_requests
    assert bound == 256
    r = http.post("/v1/completions", json={"prompt": ["hi"] * 17, "n": 16, "max_tokens": 1})  # 272 sequences
    assert r.status_code == 400 and "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["param"] == "prompt" and "272 sequences" in err["message"] and "never" in err["message"]
    r = http.post("/v1/completions", json={"prompt": ["hi"] * 16, "n": 16, "max_tokens": 1})  # exactly 256
    assert r.status_code == 200 and len(r.json()["choices"]) == 256
    assert wait_until(lambda: idle(server))


def test_sequences_withdrawn_after_a_refusal_are_not_counted_as_aborted_completions(server, http):
    assert wait_until(lambda: idle(server))
    before = http.get("/metrics").text
    r = http.post("/v1/completions", json={"prompt": [[1, 2, 3], [10**6]], "n": 2, "max_tokens": 4})
    assert r.status_code == 400  # the second prompt's token id is out of range; the first was admitted
    assert wait_until(lambda: idle(server))
    after = http.get("/metrics").text
    assert metric(after, "llmserve:withdrawn_sequences_total") - metric(before, "llmserve:withdrawn_sequences_total") \
        == 2
    for reason in ("abort", "length", "stop"):
        name = "llmserve:request_success_total"
        assert metric(after, name, finished_reason=reason) == metric(before, name, finished_reason=reason)


# ---- JSON only, CORS explicit -----------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_api_posts_must_be_json(server, content_type):
    body = b'{"prompt": "hi", "max_tokens": 1}'
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = httpx.post(server.base_url + path, content=body, headers=headers)
        assert r.status_code == 415, path
        assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                     "param": None, "code": "unsupported_media_type"}


def test_json_with_a_charset_is_json(server):
    r = httpx.post(server.base_url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 1}',
                   headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200


def test_cors_allows_no_origin_unless_configured(server):
    from starlette.testclient import TestClient

    from llmserve.server.app import ServerSettings, build_app

    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(server.base_url + "/v1/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(server.base_url + "/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    # The app holds no engine state, so a second app on the same engine tries other settings.
    settings = ServerSettings(served_model_names=["tiny"], api_key="k", allowed_origins=["https://good.example"])
    with TestClient(build_app(server.engine, settings)) as client:
        ok = client.options("/v1/completions", headers=preflight | {"Origin": "https://good.example",
                                                                     "Access-Control-Request-Headers":
                                                                         "authorization, content-type"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://good.example"
        bad = client.options("/v1/completions", headers=preflight)
        assert "access-control-allow-origin" not in bad.headers
        r = client.get("/v1/models", headers={"Origin": "https://good.example", "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://good.example"
        r = client.get("/v1/models", headers={"Origin": "https://good.example"})  # the key is still required
        assert r.status_code == 401


# ---- a client that drops a non-streamed batch ----------------------------------------------------
def test_dropping_a_non_streamed_batch_logs_no_asyncio_traceback(server, http, monkeypatch, caplog):
    assert wait_until(lambda: idle(server))
    engine = server.engine.engine
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.01), step())[1])  # 480 tokens outlast 0.5 s
    body = {"prompt": ["Once upon a time", "The quick brown fox"], "max_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    with caplog.at_level(logging.ERROR):
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        assert wait_until(lambda: idle(server), timeout=10)
        time.sleep(0.2)  # the handler's last callbacks run on the server's loop
        gc.collect()  # an unretrieved future's exception is reported when it is collected
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert "never retrieved" not in caplog.text


# ---- readiness while draining, and the API key from the environment ------------------------------------
def test_sigterm_drains_with_ready_503_before_refusing_and_the_key_comes_from_the_environment():
    port, key = free_port(), "key-from-env-5d1c"
    env = os.environ | {"LLMSERVE_API_KEY": key}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmserve.cli", "serve", str(tiny_model_path()), "--port", str(port),
         "--served-model-name", "tiny", "--num-kv-blocks", "64", "--drain-delay", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"

    def status(path: str, **kw) -> int | None:
        try:
            return httpx.get(url + path, timeout=2, **kw).status_code
        except httpx.TransportError:
            return None

    try:
        if not wait_until(lambda: status("/ready") == 200, timeout=60, interval=0.2):
            proc.kill()
            pytest.fail(f"server did not come up; its output ends:\n{proc.communicate()[0][-2000:]}")
        with open(f"/proc/{proc.pid}/cmdline") as cmdline:
            assert key not in cmdline.read()  # not in the process list
        assert status("/v1/models") == 401
        assert status("/v1/models", headers={"Authorization": f"Bearer {key}"}) == 200
        proc.send_signal(signal.SIGTERM)
        assert wait_until(lambda: status("/ready") == 503, timeout=2)  # draining: still accepting, not ready
        assert status("/health") == 200
        assert wait_until(lambda: status("/ready") is None, timeout=10)  # then the socket closes
        assert proc.wait(timeout=30) == 0
        assert "--api-key is visible" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_api_key_help_and_a_warning_for_a_key_on_the_command_line(monkeypatch, capsys, caplog):
    from llmserve.cli import build_parser
    from llmserve.server.cli import warn_if_key_on_command_line

    monkeypatch.setenv("LLMSERVE_API_KEY", "from-env")
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert (args.api_key, args.api_key_on_command_line, args.allowed_origins, args.drain_delay) == \
        ("from-env", False, [], 2.0)
    args = parser.parse_args(["serve", "--api-key", "k", "--allowed-origins", "https://a.example", "http://b:1"])
    assert (args.api_key, args.api_key_on_command_line) == ("k", True)
    with caplog.at_level(logging.WARNING, logger="llmserve.server"):
        warn_if_key_on_command_line(args)
        warn_if_key_on_command_line(parser.parse_args(["serve"]))
    assert [r.getMessage() for r in caplog.records] == [
        "--api-key is visible to every user of this machine in the process list; set LLMSERVE_API_KEY instead"]
    assert args.allowed_origins == ["https://a.example", "http://b:1"]
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "Prefer setting $LLMSERVE_API_KEY" in " ".join(capsys.readouterr().out.split())


def test_a_stream_still_running_when_the_grace_period_ends_gets_an_error_event_and_done(monkeypatch):
    import uvicorn

    from llmserve.config import EngineConfig
    from llmserve.engine.async_engine import AsyncLLMEngine
    from llmserve.server.app import ServerSettings, build_app
    from llmserve.server.graceful import GracefulServer
    from llmserve.server.streaming import cut_streams

    engine = AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model_path()), num_kv_blocks=64))
    step = engine.engine.step
    monkeypatch.setattr(engine.engine, "step", lambda: (time.sleep(0.02), step())[1])  # 400 tokens: 8 s or more
    app = build_app(engine, ServerSettings(served_model_names=["tiny"]))
    ctx = app.state.ctx
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = GracefulServer(config, on_exit=lambda: setattr(ctx, "draining", True),
                            on_grace_ending=lambda: cut_streams(ctx))
    thread = threading.Thread(target=server.run, daemon=True)
    cancelled: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            cancelled.append(record.getMessage())

    handler = Capture(level=logging.ERROR)
    try:
        thread.start()
        assert wait_until(lambda: server.started, timeout=30)
        logging.getLogger("uvicorn.error").addHandler(handler)  # uvicorn's loggers do not propagate
        body = {"messages": MSG, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            server.handle_exit(signal.SIGTERM, None)
            events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert (err["type"], err["code"]) == ("service_unavailable_error", "server_shutdown")
        thread.join(timeout=15)
        assert not thread.is_alive() and cancelled == []  # ended by itself: nothing left to cancel
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
        server.should_exit = True
        thread.join(timeout=15)
        engine.shutdown()
