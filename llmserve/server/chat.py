"""POST /v1/chat/completions, with the model's own chat template."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve.outputs import RequestOutput
from llmserve.server.errors import bad_request
from llmserve.server.params import check_context, sampling_params
from llmserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    random_id,
)
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


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    """The engine's logprobs setting: None for none, else how many alternatives per token."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


async def create_chat_completion(ctx: ServingContext, raw: Request) -> Response:
    arrival = time.monotonic()
    req = await read_json(raw, ChatCompletionRequest)
    model = ctx.check_model(req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens, _top_logprobs(req))
    prompt = await ctx.tokenization.chat_prompt(req.messages, req.add_generation_prompt)
    check_context(len(prompt.token_ids), params.max_tokens, ctx.engine.max_model_len, "messages")
    request_id = random_id("chatcmpl")
    [tracked] = await ctx.start(request_id, [prompt], params, cache_salt=req.cache_salt, priority=req.priority,
                                arrival_time=arrival)
    if req.stream:
        return StreamingResponse(_stream(ctx, req, request_id, model, tracked), media_type="text/event-stream",
                                 headers=SSE_HEADERS, background=close_after([tracked]))
    try:
        final = await until_disconnect(raw, tracked.final())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        tracked.close()
    choices = [ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text),
                          logprobs=await _logprobs(ctx, req, c.token_ids, c.logprobs),
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason) for c in final.outputs]
    body = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage([final]))
    return JSONResponse(body.model_dump())


async def _logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids, logprobs) -> ChatLogprobs | None:
    if not req.logprobs or logprobs is None:
        return None
    return await ctx.tokenization.chat_logprobs(token_ids, logprobs, req.top_logprobs or 0)


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, request_id: str, model: str,
                  tracked: TrackedRequest) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choices: list[ChatChunkChoice], **kw) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **kw))

    deltas = DeltaTracker()
    final: RequestOutput | None = None
    try:
        # OpenAI opens every choice with the role and empty content.
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(req.n)])
        async for _, out in merge([tracked]):
            choices = []
            for c in out.outputs:
                d = deltas.delta(c.index, c)
                if not d.empty:
                    choices.append(ChatChunkChoice(index=c.index, delta={"content": d.text} if d.text else {},
                                                   logprobs=await _logprobs(ctx, req, d.token_ids, d.logprobs),
                                                   finish_reason=c.finish_reason if d.finished else None))
            if choices:
                yield chunk(choices)
            final = out
        if include_usage and final is not None:
            yield chunk([], usage=usage([final]))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield sse_error(e)
    yield DONE
