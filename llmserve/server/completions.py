"""POST /v1/completions."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve.outputs import RequestOutput
from llmserve.server.errors import bad_request
from llmserve.server.params import check_context, sampling_params
from llmserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, random_id
from llmserve.server.serving import ServingContext, read_json, usage
from llmserve.server.streaming import (
    DONE,
    SSE_HEADERS,
    ClientDisconnected,
    DeltaTracker,
    close_after,
    merge,
    sse,
    sse_error,
    until_disconnect,
)
from llmserve.server.tracking import TrackedRequest


async def create_completion(ctx: ServingContext, raw: Request) -> Response:
    arrival = time.monotonic()
    req = await read_json(raw, CompletionRequest)
    model = ctx.check_model(req.model)
    if req.echo:
        raise bad_request("echo is not supported.", "echo")
    params = sampling_params(req, req.max_tokens, req.logprobs)
    prompts = await ctx.tokenization.completion_prompts(req.prompt)
    for p in prompts:
        check_context(len(p.token_ids), params.max_tokens, ctx.engine.max_model_len, "prompt")
    request_id = random_id("cmpl")
    tracked = await ctx.start(request_id, prompts, params, cache_salt=req.cache_salt, priority=req.priority,
                              arrival_time=arrival)
    if req.stream:
        events = _stream(ctx, req, request_id, model, tracked)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=close_after(tracked))
    try:
        finals = await until_disconnect(raw, asyncio.gather(*(t.final() for t in tracked)))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        for t in tracked:
            t.close()
    choices = [await _choice(ctx, req, i * req.n + c.index, c.text, c.token_ids, c.logprobs, 0, c.finish_reason,
                             c.stop_reason) for i, out in enumerate(finals) for c in out.outputs]
    body = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage(finals))
    return JSONResponse(body.model_dump())


async def _choice(ctx: ServingContext, req: CompletionRequest, index: int, text: str, token_ids, logprobs,
                  text_offset: int, finish_reason: str | None, stop_reason) -> CompletionChoice:
    lp = None
    if req.logprobs is not None and logprobs is not None:
        lp = await ctx.tokenization.completion_logprobs(token_ids, logprobs, req.logprobs, text_offset)
    return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason, stop_reason=stop_reason)


async def _stream(ctx: ServingContext, req: CompletionRequest, request_id: str, model: str,
                  tracked: list[TrackedRequest]) -> AsyncIterator[str]:
    created = int(time.time())
    deltas = DeltaTracker()
    finals: list[RequestOutput] = []
    try:
        async for i, out in merge(tracked):
            choices = []
            for c in out.outputs:
                index = i * req.n + c.index
                d = deltas.delta(index, c)
                if not d.empty:
                    choices.append(await _choice(ctx, req, index, d.text, d.token_ids, d.logprobs, d.text_offset,
                                                 c.finish_reason if d.finished else None,
                                                 c.stop_reason if d.finished else None))
            if choices:
                yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices))
            if out.finished:
                finals.append(out)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=usage(finals)))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield sse_error(e)
    yield DONE
