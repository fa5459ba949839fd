"""POST /v1/chat/completions, with the model's own chat template, structured outputs and tools."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve.outputs import RequestOutput
from llmserve.server.errors import bad_request
from llmserve.server.params import check_context, compile_grammar, sampling_params, structured_outputs
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
    stream_cut,
    sse,
    sse_error,
    until_disconnect,
)
from llmserve.server.tracking import TrackedRequest
from llmserve.tokenizer import template_supports_tools
from llmserve.tools import ParsedOutput, ToolChoicePlan, get_tool_parser, plan_tool_choice
from llmserve.tools.stream import ChoiceToolStream


def _top_logprobs(req: ChatCompletionRequest) -> int | None:
    """The engine's logprobs setting: None for none, else how many alternatives per token."""
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _tool_plan(ctx: ServingContext, req: ChatCompletionRequest) -> ToolChoicePlan | None:
    """What tools and tool_choice ask for; a 400 for what this model's template cannot do."""
    supports = template_supports_tools(ctx.engine.tokenizer)
    if not supports and any(m.role == "tool" or m.tool_calls for m in req.messages):
        raise bad_request("This model's chat template does not support tool calls or tool messages.", "messages")
    if not req.tools:
        if req.tool_choice is not None and req.tool_choice != "none":
            raise bad_request("tool_choice needs tools.", "tool_choice")
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names.", "tools")
    if req.tool_choice == "none" and not supports:
        return None  # no call is wanted, and the template could not show the tools anyway
    if not supports:
        raise bad_request("This model's chat template does not support tools.", "tools")
    choice = req.tool_choice.model_dump() if req.tool_choice is not None and not isinstance(
        req.tool_choice, str) else req.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    try:
        return plan_tool_choice(tools, choice, req.parallel_tool_calls)
    except KeyError:
        raise bad_request("tool_choice names a function that is not in tools.", "tool_choice") from None


async def create_chat_completion(ctx: ServingContext, raw: Request) -> Response:
    arrival = time.monotonic()
    req = await read_json(raw, ChatCompletionRequest)
    model = ctx.check_model(req.model)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    plan = _tool_plan(ctx, req)
    so, so_param = structured_outputs(req)
    if plan is not None and plan.grammar is not None:
        if so is not None:
            raise bad_request(f"{so_param} cannot be combined with a required or named tool_choice.", so_param)
        so, so_param = plan.grammar, "tools"
    params = sampling_params(req, max_tokens, _top_logprobs(req), so)
    if so is not None:
        await compile_grammar(ctx, so, so_param)
    template_kwargs = {"split_special_tokens": req.split_special_tokens}
    if plan is not None:
        template_kwargs["tools"] = plan.tools
    prompt = await ctx.tokenization.chat_prompt(req.messages, req.add_generation_prompt, **template_kwargs)
    check_context(len(prompt.token_ids), params.max_tokens, ctx.engine.max_model_len, "messages", params.min_tokens)
    request_id = random_id("chatcmpl")
    [tracked] = await ctx.start(request_id, [prompt], params, cache_salt=req.cache_salt, priority=req.priority,
                                arrival_time=arrival)
    if req.stream:
        return StreamingResponse(_stream(ctx, req, request_id, model, tracked, plan), media_type="text/event-stream",
                                 headers=SSE_HEADERS, background=close_after([tracked]))
    try:
        final = await until_disconnect(raw, tracked.final())
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        tracked.close()
    choices = []
    for c in final.outputs:
        message, finish_reason = _message(plan, c.text, c.finish_reason)
        choices.append(ChatChoice(index=c.index, message=message,
                                  logprobs=await _logprobs(ctx, req, c.token_ids, c.logprobs),
                                  finish_reason=finish_reason, stop_reason=c.stop_reason))
    body = ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=usage([final]))
    return JSONResponse(body.model_dump())


def _message(plan: ToolChoicePlan | None, text: str,
             finish_reason: str | None) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of a finished choice: its tool calls parsed out when tools are in play."""
    if plan is None or plan.mode == "none":
        return ChatResponseMessage(content=text), finish_reason
    parsed: ParsedOutput = (get_tool_parser().extract(text) if plan.mode == "auto" else plan.parse_constrained(text))
    calls = parsed.calls if plan.parallel else parsed.calls[:1]
    if not calls:
        return ChatResponseMessage(content=text), finish_reason
    return (ChatResponseMessage(content=parsed.content, tool_calls=[c.openai() for c in calls]),
            "tool_calls" if finish_reason == "stop" else finish_reason)


async def _logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids, logprobs) -> ChatLogprobs | None:
    if not req.logprobs or logprobs is None:
        return None
    return await ctx.tokenization.chat_logprobs(token_ids, logprobs, req.top_logprobs or 0)


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, request_id: str, model: str,
                  tracked: TrackedRequest, plan: ToolChoicePlan | None) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(choices: list[ChatChunkChoice], **kw) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, **kw))

    deltas = DeltaTracker()
    tool_streams = ({i: ChoiceToolStream(plan, get_tool_parser()) for i in range(req.n)}
                    if plan is not None and plan.mode != "none" else {})
    final: RequestOutput | None = None
    try:
        # OpenAI opens every choice with the role and empty content.
        yield chunk([ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}) for i in range(req.n)])
        async for _, out in merge([tracked], stream_cut(ctx)):
            choices = []
            for c in out.outputs:
                d = deltas.delta(c.index, c)
                if d.empty:
                    continue
                tools = tool_streams.get(c.index)
                finish_reason = c.finish_reason if d.finished else None
                if tools is None:
                    delta = {"content": d.text} if d.text else {}
                else:
                    delta = tools.delta(d.text, d.finished)
                    if finish_reason == "stop" and tools.made_calls:
                        finish_reason = "tool_calls"
                lp = await _logprobs(ctx, req, d.token_ids, d.logprobs)
                if delta or finish_reason is not None or lp is not None:
                    choices.append(ChatChunkChoice(index=c.index, delta=delta, logprobs=lp,
                                                   finish_reason=finish_reason))
            if choices:
                yield chunk(choices)
            final = out
        if include_usage and final is not None:
            yield chunk([], usage=usage([final]))
    except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
        yield sse_error(e)
    yield DONE
