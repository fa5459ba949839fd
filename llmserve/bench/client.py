"""The streaming request of the serving benchmark: one OpenAI-compatible call, timed on the client.

Works with any server that streams Server-Sent Events the OpenAI way (llmserve, vLLM, llama.cpp):
`data: {json}` lines, `data: [DONE]` at the end, an optional final usage chunk
(`stream_options.include_usage`).

Timing follows `vllm bench serve`: every event with a choice is a streamed chunk (TTFT at the
first, ITL between consecutive ones, E2E at the last), including chunks whose text is empty (a
special token, or tokens whose text is held back). One exception: chat's opening delta that carries
only the role and no content. Some servers (llmserve among them) send it before generating
anything, so counting it would make TTFT the time to accept the request, not to the first token.

Output tokens come from the final usage chunk when the server sends one; otherwise they are the
chunks counted, less a bare closing chunk (empty text with a finish reason) after the last token.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from llmserve.bench.metrics import RequestResult
from llmserve.bench.workloads import BenchRequest

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_ERROR_CHARS = 300


@dataclass
class ClientConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = COMPLETIONS
    model: str = "default"
    temperature: float = 0.0
    ignore_eos: bool = True
    include_usage: bool = True
    extra_body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


def build_payload(cfg: ClientConfig, req: BenchRequest) -> dict:
    body: dict = {"model": cfg.model, "max_tokens": req.output_len, "temperature": cfg.temperature,
                  "stream": True}
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.chat:
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint takes text prompts only (use --prompt-format text)")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _piece(choice: dict, chat: bool) -> tuple[str | None, bool]:
    """(generated text or None, whether the chunk is a role-only opening delta)."""
    if chat:
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if not text:
            text = delta.get("reasoning_content") or delta.get("reasoning") or text
        role_only = "role" in delta and not text and choice.get("finish_reason") is None
        return text, role_only
    return choice.get("text"), False


def is_token_chunk(choice: dict, chat: bool) -> bool:
    """Whether a choice event counts as a streamed chunk: all do but chat's role-only opening delta."""
    _, role_only = _piece(choice, chat)
    return not role_only


def is_bare_finish(choice: dict, chat: bool) -> bool:
    text, _ = _piece(choice, chat)
    return not text and choice.get("finish_reason") is not None


def handle_event(data: dict, chat: bool, now: float, st: float, out: RequestResult, last: float) -> float:
    """Fold one SSE JSON event into `out`; returns the time of the latest token chunk."""
    if data.get("error"):
        err = data["error"]
        msg = err.get("message") if isinstance(err, dict) else str(err)
        out.error = f"server error in stream: {str(msg)[:MAX_ERROR_CHARS]}"
        return last
    usage = data.get("usage")
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            out.output_tokens = int(usage["completion_tokens"])
            out.usage_reported = True
        if usage.get("prompt_tokens") is not None:
            out.prompt_len = int(usage["prompt_tokens"])
    choices = data.get("choices") or []
    if choices and is_token_chunk(choices[0], chat):
        if out.num_chunks == 0:
            out.ttft = now - st
        else:
            out.itl.append(now - last)
        out.num_chunks += 1
        if is_bare_finish(choices[0], chat) and out.num_chunks > 1:
            out.bare_finish_chunks += 1
        return now
    return last


async def send_request(client: httpx.AsyncClient, cfg: ClientConfig, req: BenchRequest) -> RequestResult:
    """Send one streaming request and time it. Never raises for a failed request: the result says so."""
    out = RequestResult(prompt_len=req.prompt_len)
    payload = build_payload(cfg, req)
    st = time.perf_counter()
    out.start_time = st
    last = st
    try:
        async with client.stream("POST", cfg.url, json=payload, headers=cfg.headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                out.error = f"HTTP {resp.status_code}: {body[:MAX_ERROR_CHARS]}"
                return out
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments (": ping"), event:/id: fields
                chunk = line[5:].strip()
                if chunk == "[DONE]":
                    break
                now = time.perf_counter()
                try:
                    data = json.loads(chunk)
                except json.JSONDecodeError:
                    out.error = "a stream event is not JSON"
                    return out
                last = handle_event(data, cfg.chat, now, st, out, last)
                if out.error:
                    return out
    except httpx.HTTPError as e:
        out.error = f"{e.__class__.__name__}: {str(e)[:MAX_ERROR_CHARS]}"
        return out
    if out.num_chunks == 0:
        out.error = "the stream carried no token"
        return out
    out.latency = last - st
    if not out.usage_reported:
        out.output_tokens = max(1, out.num_chunks - out.bare_finish_chunks)
    out.success = True
    return out
