"""The benchmark tools: metric math on synthetic timings, workload shapes, the SSE client against a
fake streaming server, and `llmserve bench throughput | serve` end to end on a tiny model.
Behaviour only: no test asserts a timing threshold."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from llmserve.bench.client import (
    ClientConfig,
    build_payload,
    handle_event,
    is_token_chunk,
)
from llmserve.bench.metrics import (
    RequestResult,
    compute_metrics,
    goodput_rate,
    meets_slos,
    parse_goodput,
    parse_percentiles,
)
from llmserve.bench.serve import arrival_offsets, json_safe, parse_rates
from llmserve.bench.workloads import (
    SHAPES,
    BenchRequest,
    PromptFactory,
    build_requests,
    load_workload_file,
    sample_lengths,
    write_workload_file,
)

sys.path.insert(0, str(Path(__file__).parent))


# ---- metric math on hand-computed timings ----------------------------------------------------
def _results() -> list[RequestResult]:
    # r1: TTFT 100 ms, gaps 20/30/50 ms, 4 tokens -> E2E 200 ms, TPOT (200-100)/3 = 33.33 ms
    # r2: TTFT 300 ms, one gap of 100 ms, 2 tokens -> E2E 400 ms, TPOT 100 ms
    # r3: TTFT 50 ms, 1 token -> E2E 50 ms, no TPOT (counts as 0 for goodput)
    # r4: failed
    return [
        RequestResult(True, 10, 4, 0.100, [0.020, 0.030, 0.050], 0.200, 0.0, 4),
        RequestResult(True, 20, 2, 0.300, [0.100], 0.400, 0.1, 2),
        RequestResult(True, 30, 1, 0.050, [], 0.050, 0.15, 1),
        RequestResult(False, 40, 0, error="boom"),
    ]


def test_metrics_match_hand_computed_values():
    m = compute_metrics(_results(), 2.0, percentiles=[50, 99])
    assert (m["completed"], m["failed"], m["num_requests"]) == (3, 1, 4)
    assert m["total_input_tokens"] == 60 and m["total_output_tokens"] == 7
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(3.5)
    assert m["total_token_throughput"] == pytest.approx(33.5)
    # TTFT over completed requests: 100, 300, 50
    assert m["mean_ttft_ms"] == pytest.approx(150.0)
    assert m["median_ttft_ms"] == pytest.approx(100.0)
    assert m["p99_ttft_ms"] == pytest.approx(100.0 + 0.98 * 200.0)  # linear interpolation, as numpy/vLLM
    # TPOT only over requests with more than one token: 33.33, 100
    assert m["mean_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    assert m["median_tpot_ms"] == pytest.approx((100 / 3 + 100) / 2)
    # ITL pooled over every gap: 20, 30, 50, 100
    assert m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["median_itl_ms"] == pytest.approx(40.0)
    assert m["p50_itl_ms"] == pytest.approx(40.0)
    # E2E: 200, 400, 50
    assert m["mean_e2el_ms"] == pytest.approx(650 / 3)
    assert m["median_e2el_ms"] == pytest.approx(200.0)
    # r1 [0, 0.2], r2 [0.1, 0.5], r3 [0.15, 0.2]: three in flight at 0.15
    assert m["max_concurrency_observed"] == 3
    assert "request_goodput" not in m


def test_goodput_and_attainment():
    res = _results()
    m = compute_metrics(res, 2.0, slos={"ttft": 200, "tpot": 50})
    # r1 meets both; r2 misses TTFT; r3 meets (TPOT counts as 0); r4 failed
    assert [meets_slos(r, {"ttft": 200, "tpot": 50}) for r in res] == [True, False, True, False]
    assert m["good_requests"] == 2
    assert m["request_goodput"] == pytest.approx(1.0)
    assert m["slo_attainment"] == pytest.approx(0.5)  # of all 4 requests sent
    m = compute_metrics(res, 2.0, slos={"e2el": 100})
    assert m["good_requests"] == 1  # only r3 (50 ms)
    m = compute_metrics(res, 2.0, slos={"tpot": 100.5})
    assert m["good_requests"] == 3  # 33.3, 100, 0
    runs = [{"request_rate": r, "metrics": {"slo_attainment": a}}
            for r, a in [(1.0, 0.95), (2.0, 0.92), (4.0, 0.5), (3.0, 0.89)]]
    assert goodput_rate(runs, 0.9) == 2.0
    assert goodput_rate(runs, 0.99) is None


def test_empty_and_all_failed_runs_do_not_crash():
    m = compute_metrics([RequestResult(False, error="x")], 1.0, slos={"ttft": 1})
    assert m["completed"] == 0 and m["slo_attainment"] == 0.0 and m["mean_ttft_ms"] == 0.0


def test_parsers():
    assert parse_goodput(["ttft:200", "tpot:100", "e2e:5000"]) == {"ttft": 200.0, "tpot": 100.0, "e2el": 5000.0}
    assert parse_goodput(["ttft:250,tpot:80"]) == {"ttft": 250.0, "tpot": 80.0}
    for bad in (["ttft"], ["itl:5"], ["ttft:abc"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)
    assert parse_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(ValueError):
        parse_percentiles("0")
    assert parse_rates("1,2,inf") == [1.0, 2.0, math.inf]
    with pytest.raises(ValueError):
        parse_rates("0")
    assert json_safe({"r": [math.inf, 1.0]}) == {"r": ["inf", 1.0]}


# ---- arrivals and workloads ------------------------------------------------------------------
def test_arrivals_poisson_gamma_and_inf():
    rng = np.random.default_rng(0)
    assert arrival_offsets(5, math.inf, 1.0, rng) == [0.0] * 5
    offs = arrival_offsets(20001, 4.0, 1.0, np.random.default_rng(1))
    gaps = np.diff(offs)
    assert offs[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    bursty = np.diff(arrival_offsets(20001, 4.0, 0.25, np.random.default_rng(2)))
    assert bursty.mean() == pytest.approx(0.25, rel=0.08)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.08)  # gamma shape k: CV 1/sqrt(k)


def test_lognormal_shapes_and_caps():
    for name, ((pmu, _), (omu, _)) in SHAPES.items():
        lens = sample_lengths(name, 4000, seed=3, max_input_len=10**9, max_output_len=10**9)
        ins = np.log([a for a, _ in lens])
        outs = np.log([b for _, b in lens])
        assert np.median(ins) == pytest.approx(pmu, abs=0.1)
        assert np.median(outs) == pytest.approx(omu, abs=0.1)
    capped = sample_lengths("summarization", 2000, seed=3, max_input_len=1024, max_output_len=64)
    assert max(a for a, _ in capped) == 1024 and max(b for _, b in capped) == 64
    assert min(a for a, _ in capped) >= 1
    rnd = sample_lengths("random", 100, input_len=100, output_len=10, range_ratio=0.5)
    assert all(50 <= a <= 150 and 5 <= b <= 15 for a, b in rnd)
    assert sample_lengths("random", 3, input_len=7, output_len=2) == [(7, 2)] * 3


def test_prompts_sized_in_tokens():
    from tiny_models import byte_tokenizer

    tok = byte_tokenizer()
    f = PromptFactory(tok, seed=0)
    reqs = build_requests("random", 5, f, as_ids=False, input_len=40, output_len=3)
    for r in reqs:
        assert isinstance(r.prompt, str) and len(tok.encode(r.prompt, add_special_tokens=False)) == r.prompt_len == 40
    ids = build_requests("random", 4, f, as_ids=True, input_len=33, output_len=3)
    special = set(tok.all_special_ids)
    assert all(len(r.prompt) == 33 and not special & set(r.prompt) for r in ids)
    sp = build_requests("shared-prefix", 6, f, as_ids=True, input_len=8, output_len=2, prefix_len=32, num_prefixes=2)
    assert [len(r.prompt) for r in sp] == [40] * 6
    assert sp[0].prompt[:32] == sp[2].prompt[:32] != sp[1].prompt[:32]
    assert sp[0].prompt[32:] != sp[2].prompt[32:]
    words = PromptFactory(None, seed=0).text(25)
    assert len(words[0].split()) == 25 and words[1] == 25
    capped = build_requests("chat", 20, f, as_ids=True, max_total_len=100)
    assert all(r.prompt_len + r.output_len <= 100 for r in capped)
    assert "prompt_len" in repr(reqs[0]) and reqs[0].prompt[:10] not in repr(reqs[0])


def test_workload_file_roundtrip(tmp_path):
    from tiny_models import byte_tokenizer

    tok = byte_tokenizer()
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}\n')
    f = PromptFactory(tok)
    as_ids = load_workload_file(path, f, as_ids=True)
    assert as_ids[0].prompt == tok.encode("hello there") and as_ids[0].output_len == 5
    assert as_ids[1].prompt == [1, 2, 3] and as_ids[1].output_len == 2
    as_text = load_workload_file(path, f, as_ids=False)
    assert as_text[0].prompt == "hello there" and isinstance(as_text[1].prompt, str)
    out = tmp_path / "copy.jsonl"
    write_workload_file(out, as_ids)
    assert [r.prompt for r in load_workload_file(out, as_ids=True)] == [r.prompt for r in as_ids]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="output_len"):
        load_workload_file(bad)


# ---- the SSE client --------------------------------------------------------------------------
def test_stream_events_fold_into_vllm_timings():
    out = RequestResult(prompt_len=3)
    events = [  # (time, event) for a chat stream
        (0.05, {"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}),
        (0.10, {"choices": [{"delta": {"content": "Hel"}, "finish_reason": None}]}),
        (0.15, {"choices": [{"delta": {"content": "lo"}, "finish_reason": None}]}),
        (0.35, {"choices": [{"delta": {"content": "!"}, "finish_reason": None}]}),
        (0.36, {"choices": [{"delta": {}, "finish_reason": "stop"}]}),
        (0.37, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}),
    ]
    last = 0.0
    for t, ev in events:
        last = handle_event(ev, True, t, 0.0, out, last)
    assert out.ttft == pytest.approx(0.10)  # the role-only opening delta is not a token
    assert out.itl == pytest.approx([0.05, 0.20, 0.01])  # every later chunk counts, as in vLLM
    assert last == pytest.approx(0.36)
    assert out.num_chunks == 4 and out.bare_finish_chunks == 1
    assert out.output_tokens == 4 and out.usage_reported and out.prompt_len == 7
    out.latency = last
    assert out.tpot == pytest.approx((0.36 - 0.10) / 3)
    assert is_token_chunk({"text": "", "finish_reason": None}, chat=False)
    assert is_token_chunk({"delta": {"content": "x"}}, chat=True)
    assert not is_token_chunk({"delta": {"role": "assistant"}}, chat=True)
    assert is_token_chunk({"delta": {"role": "assistant"}, "finish_reason": "stop"}, chat=True)
    err = RequestResult()
    handle_event({"error": {"message": "overloaded"}}, False, 1.0, 0.0, err, 0.0)
    assert "overloaded" in err.error


def test_payloads():
    cfg = ClientConfig(model="m", ignore_eos=True, extra_body={"top_k": 5})
    p = build_payload(cfg, BenchRequest([1, 2], 2, 9))
    assert p["prompt"] == [1, 2] and p["max_tokens"] == 9 and p["stream"] and p["ignore_eos"] and p["top_k"] == 5
    assert p["stream_options"] == {"include_usage": True}
    chat = ClientConfig(endpoint="/v1/chat/completions", ignore_eos=False, include_usage=False)
    p = build_payload(chat, BenchRequest("hi", 1, 3))
    assert p["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in p and "stream_options" not in p
    with pytest.raises(ValueError):
        build_payload(chat, BenchRequest([1], 1, 3))


class FakeOpenAIServer:
    """A minimal OpenAI-compatible streaming server on 127.0.0.1 (raw asyncio, chunked SSE).
    Streams `max_tokens` one-word chunks, a role chunk first for chat, a bare finish chunk, and a
    usage chunk when asked. Requests whose prompt is "fail" get a 400."""

    def __init__(self, delay: float = 0.001) -> None:
        self.delay = delay
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            length = next((int(h.split(":", 1)[1]) for h in head[1:] if h.lower().startswith("content-length:")), 0)
            body = json.loads(await reader.readexactly(length)) if length else {}
            if method == "GET" and path == "/v1/models":
                data = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                return
            self.bodies.append(body)
            if body.get("prompt") == "fail" or path not in ("/v1/completions", "/v1/chat/completions"):
                data = b'{"error": {"message": "bad request"}}'
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
                return
            chat = path.endswith("chat/completions")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n")

            async def send(event, raw: bool = False) -> None:
                text = event if raw else f"data: {event if isinstance(event, str) else json.dumps(event)}"
                payload = f"{text}\n\n".encode()
                writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
                await writer.drain()

            n = int(body["max_tokens"])
            await send(": keep-alive", raw=True)  # an SSE comment: skipped
            if chat:
                await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n):
                await asyncio.sleep(self.delay)
                piece = {"delta": {"content": f" w{i}"}} if chat else {"text": f" w{i}"}
                await send({"choices": [{"index": 0, **piece, "finish_reason": None}]})
            await send({"choices": [{"index": 0, **({"delta": {}} if chat else {"text": ""}),
                                     "finish_reason": "length"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                await send({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n,
                                                     "total_tokens": 11 + n}})
            await send("[DONE]")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
def fake_server():
    srv = FakeOpenAIServer()
    yield srv
    srv.close()


def _run_cli(argv: list[str]) -> None:
    from llmserve.cli import main

    main(argv)


def test_bench_serve_against_fake_server_sweep(fake_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    png = tmp_path / "serve.png"
    _run_cli(["bench", "serve", "--base-url", fake_server.base_url, "--num-prompts", "12", "--input-len", "20",
              "--output-len", "6", "--request-rate", "200,inf", "--goodput", "ttft:60000", "tpot:60000",
              "--metric-percentiles", "50,99", "--output-json", str(out), "--plot", str(png), "--disable-tqdm"])
    data = json.loads(out.read_text())
    assert data["model"] == "fake-model" and data["request_rates"] == [200.0, "inf"]
    assert data["slos"] == {"ttft": 60000.0, "tpot": 60000.0} and data["goodput_rate"] == "inf"
    assert len(data["runs"]) == 2
    for run in data["runs"]:
        m = run["metrics"]
        assert m["completed"] == 12 and m["failed"] == 0
        assert m["total_output_tokens"] == 72 and m["total_input_tokens"] == 12 * 11  # from usage
        assert m["usage_reported_fraction"] == 1.0 and m["slo_attainment"] == 1.0
        for key in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "p50", "p99"):
                assert m[f"{stat}_{key}_ms"] >= 0
        assert len(run["requests"]) == 12
        r0 = run["requests"][0]
        # 6 token chunks and the bare closing chunk, timed as vLLM times them
        assert r0["num_chunks"] == 7 and len(r0["itl_ms"]) == 6 and r0["tpot_ms"] is not None
    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional: matplotlib may be absent
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what the server received: streaming, usage, ignore_eos for a synthetic workload, text prompts
    body = fake_server.bodies[-1]
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == 6 and isinstance(body["prompt"], str)
    assert len(body["prompt"].split()) == 20  # no tokenizer: one word a token
    # Each rate sends prompts of the same lengths but new words: a prefix cache filled at one rate
    # answers nothing at the next.
    sent = [b["prompt"] for b in fake_server.bodies if "prompt" in b]  # the test request, then the two rates
    first, second = set(sent[1:13]), set(sent[13:])
    assert len(sent) == 1 + 2 * 12 and len(first) == len(second) == 12 and not first & second
    assert sorted(len(t.split()) for t in first) == sorted(len(t.split()) for t in second)
    text = capsys.readouterr().out
    assert "Mean TTFT (ms)" in text and "Goodput" in text


def test_bench_serve_chat_without_usage_counts_chunks(fake_server, tmp_path):
    out = tmp_path / "chat.json"
    _run_cli(["bench", "serve", "--base-url", fake_server.base_url, "--endpoint", "/v1/chat/completions",
              "--model", "fake-model", "--workload", "code", "--max-input-len", "50", "--max-output-len", "5",
              "--num-prompts", "6", "--max-concurrency", "2", "--no-usage", "--burstiness", "0.5",
              "--request-rate", "500", "--output-json", str(out), "--no-plot", "--disable-tqdm"])
    data = json.loads(out.read_text())
    m = data["runs"][0]["metrics"]
    assert m["completed"] == 6 and m["usage_reported_fraction"] == 0.0
    assert m["max_concurrency_observed"] <= 2
    # without usage, output tokens are the chunks less the role and bare closing chunks
    rows = data["runs"][0]["requests"]
    assert all(r["output_tokens"] == r["num_chunks"] - 1 for r in rows)
    assert m["total_output_tokens"] == sum(r["output_tokens"] for r in rows) <= 6 * 5
    assert "messages" in fake_server.bodies[-1] and "stream_options" not in fake_server.bodies[-1]


def test_bench_serve_reports_failed_requests(fake_server, tmp_path):
    wl = tmp_path / "w.jsonl"
    wl.write_text('{"prompt": "fine", "output_len": 3}\n{"prompt": "fail", "output_len": 3}\n')
    out = tmp_path / "f.json"
    _run_cli(["bench", "serve", "--base-url", fake_server.base_url, "--workload-file", str(wl),
              "--output-json", str(out), "--no-plot", "--disable-tqdm"])
    data = json.loads(out.read_text())
    m = data["runs"][0]["metrics"]
    assert (m["completed"], m["failed"]) == (1, 1)
    assert data["workload"]["workload"] == "file" and data["workload"]["ignore_eos"] is False
    assert "HTTP 400" in data["runs"][0]["requests"][1]["error"]


def test_bench_serve_fails_cleanly_when_test_request_fails(fake_server, tmp_path):
    wl = tmp_path / "w.jsonl"
    wl.write_text('{"prompt": "fail", "output_len": 3}\n')
    with pytest.raises(SystemExit) as e:
        _run_cli(["bench", "serve", "--base-url", fake_server.base_url, "--workload-file", str(wl),
                  "--result-dir", str(tmp_path), "--no-plot", "--disable-tqdm"])
    assert e.value.code == 2


# ---- end to end on a tiny model --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tiny_models import llama_config, make_model_folder

    folder = tmp_path_factory.mktemp("bench") / "tiny"
    make_model_folder(folder, llama_config())
    return folder


def test_bench_throughput_offline(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tp.json"
    _run_cli(["bench", "throughput", "--model", str(tiny_folder), "--num-prompts", "6", "--input-len", "24",
              "--output-len", "5", "--range-ratio", "0.5", "--num-kv-blocks", "64", "--output-json", str(out),
              "--disable-tqdm"])
    data = json.loads(out.read_text())
    for key in ("elapsed_time", "requests_per_second", "output_tokens_per_second", "tokens_per_second",
                "total_prompt_tokens", "total_output_tokens", "workload", "engine", "machine"):
        assert key in data
    assert data["num_requests"] == 6
    # ignore_eos is on for synthetic lengths: exactly the requested output tokens
    assert data["total_output_tokens"] == data["requested_output_tokens"]
    assert data["workload"]["ignore_eos"] is True
    assert "output tokens/s" in capsys.readouterr().out


def test_bench_throughput_shared_prefix_and_file(tiny_folder, tmp_path):
    out = tmp_path / "sp.json"
    _run_cli(["bench", "throughput", "--model", str(tiny_folder), "--workload", "shared-prefix", "--prefix-len", "32",
              "--num-prefixes", "1", "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
              "--num-kv-blocks", "64", "--output-json", str(out), "--disable-tqdm", "--warmup", "0"])
    data = json.loads(out.read_text())
    assert data["total_prompt_tokens"] == 3 * 36 and data["total_output_tokens"] == 6
    wl = tmp_path / "w.jsonl"
    wl.write_text('{"prompt": "the theme", "output_len": 3}\n{"prompt_token_ids": [5, 6, 7], "output_len": 2}\n')
    _run_cli(["bench", "throughput", "--model", str(tiny_folder), "--workload-file", str(wl), "--ignore-eos",
              "--num-kv-blocks", "64", "--output-json", str(out), "--disable-tqdm"])
    data = json.loads(out.read_text())
    assert data["num_requests"] == 2 and data["total_output_tokens"] == 5
    assert data["workload"]["workload"] == "file"


def test_bench_serve_against_llmserve_server(tiny_folder, tmp_path):
    """The client against llmserve's own server, token-id prompts and text, when the server is importable."""
    try:
        from server_fixtures import start_server

        import llmserve.server.app  # noqa: F401
    except ImportError:
        pytest.skip("llmserve.server is not available")
    srv = start_server(tiny_folder, served_model_name="tiny", device="cpu", dtype="float32", num_kv_blocks=128)
    try:
        for fmt in ("ids", "text"):
            out = tmp_path / f"{fmt}.json"
            _run_cli(["bench", "serve", "--base-url", srv.base_url, "--prompt-format", fmt, "--tokenizer",
                      str(tiny_folder), "--num-prompts", "4", "--input-len", "16", "--output-len", "4",
                      "--request-rate", "inf", "--output-json", str(out), "--no-plot", "--disable-tqdm"])
            m = json.loads(out.read_text())["runs"][0]["metrics"]
            assert m["completed"] == 4 and m["failed"] == 0
            assert m["total_output_tokens"] == 16  # ignore_eos honoured, usage reported
            assert m["total_input_tokens"] == 4 * 16  # text sized with the tokenizer is exact too
    finally:
        srv.stop()


def test_text_prompts_are_sized_with_the_default_models_tokenizer_when_it_is_served():
    """Against a server of llmserve's default model, text prompts are sized with its tokenizer
    (exact counts); against an unknown model without --tokenizer, a word a token."""
    from types import SimpleNamespace

    from llmserve.bench.cli import _load_tokenizer
    from llmserve.model.default_model import DEFAULT_MODEL_NAME

    args = SimpleNamespace(tokenizer=None, prompt_format="text")
    tok = _load_tokenizer(args, DEFAULT_MODEL_NAME)
    assert tok is not None
    text, n = PromptFactory(tok, seed=3).text(300)
    assert n == 300 and len(tok.encode(text, add_special_tokens=False)) == 300
    assert _load_tokenizer(args, "some-other-model") is None
