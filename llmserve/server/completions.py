"""POST /v1/completions: with echo, best_of (vLLM's semantics) and structured outputs."""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.sampling_params import MAX_N, SamplingParams
from llmserve.server.errors import bad_request
from llmserve.server.inputs import Prompt
from llmserve.server.params import check_context, compile_grammar, sampling_params, structured_outputs
from llmserve.server.protocol import CompletionChoice, CompletionRequest, CompletionResponse, random_id
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


def _engine_params(req: CompletionRequest, params: SamplingParams) -> SamplingParams:
    """best_of: generate best_of sequences (with logprobs, for their cumulative logprob) and return
    the n best (vLLM's semantics). echo with logprobs: the prompt's logprobs too."""
    changes = {}
    if req.best_of is not None:
        if not 1 <= req.best_of <= MAX_N or req.best_of < req.n:
            raise bad_request(f"best_of must be an integer in [n, {MAX_N}].", "best_of")
        if req.stream and req.best_of != req.n:
            raise bad_request("best_of greater than n is not supported when streaming.", "best_of")
        if req.best_of > req.n:
            changes |= {"n": req.best_of, "logprobs": params.logprobs or 0}
    if req.echo and req.logprobs is not None:
        changes["prompt_logprobs"] = req.logprobs
    return dataclasses.replace(params, **changes) if changes else params


async def create_completion(ctx: ServingContext, raw: Request) -> Response:
    arrival = time.monotonic()
    req = await read_json(raw, CompletionRequest)
    model = ctx.check_model(req.model)
    so, so_param = structured_outputs(req)
    params = _engine_params(req, sampling_params(req, req.max_tokens, req.logprobs, so))
    if so is not None:
        await compile_grammar(ctx, so, so_param)
    prompts = await ctx.tokenization.completion_prompts(req.prompt)
    for p in prompts:
        check_context(len(p.token_ids), params.max_tokens, ctx.engine.max_model_len, "prompt", params.min_tokens)
    echoes = await _echo_texts(ctx, req, prompts) if req.echo else None
    request_id = random_id("cmpl")
    tracked = await ctx.start(request_id, prompts, params, cache_salt=req.cache_salt, priority=req.priority,
                              arrival_time=arrival)
    if req.stream:
        events = _stream(ctx, req, request_id, model, tracked, echoes)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=close_after(tracked))
    try:
        finals = await until_disconnect(raw, asyncio.gather(*(t.final() for t in tracked)))
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        for t in tracked:
            t.close()
    choices = []
    for i, out in enumerate(finals):
        for j, c in enumerate(_best(out.outputs, req.n)):
            text, ids, lps = _with_echo(req, out, c, echoes[i] if echoes else None)
            choices.append(await _choice(ctx, req, i * req.n + j, text, ids, lps, 0, c.finish_reason, c.stop_reason))
    body = CompletionResponse(id=request_id, model=model, choices=choices, usage=usage(finals))
    return JSONResponse(body.model_dump())


def _best(outputs: list[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n sequences with the highest cumulative logprob (all of them, in order, when n of n)."""
    if len(outputs) <= n:
        return outputs
    return sorted(outputs, key=lambda c: c.cumulative_logprob or 0.0, reverse=True)[:n]


async def _echo_texts(ctx: ServingContext, req: CompletionRequest, prompts: list[Prompt]) -> list[str]:
    """The prompt text to echo for each prompt: the text as sent, or token ids decoded."""
    if isinstance(req.prompt, str):
        return [req.prompt]
    if isinstance(req.prompt[0], str):
        return list(req.prompt)
    return [await ctx.tokenization.decode(p.token_ids) for p in prompts]


def _with_echo(req: CompletionRequest, out: RequestOutput, c: CompletionOutput,
               echo: str | None) -> tuple[str, list[int], list[PositionLogprobs | None] | None]:
    """A choice's text, token ids and logprobs, with the prompt's in front when echo is set."""
    if echo is None:
        return c.text, c.token_ids, c.logprobs
    lps = None
    if c.logprobs is not None and out.prompt_logprobs is not None:
        lps = list(out.prompt_logprobs) + list(c.logprobs)
    return echo + c.text, list(out.prompt_token_ids) + list(c.token_ids), lps


async def _choice(ctx: ServingContext, req: CompletionRequest, index: int, text: str, token_ids, logprobs,
                  text_offset: int, finish_reason: str | None, stop_reason) -> CompletionChoice:
    lp = None
    if req.logprobs is not None and logprobs is not None:
        lp = await ctx.tokenization.completion_logprobs(token_ids, logprobs, req.logprobs, text_offset)
    return CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason, stop_reason=stop_reason)


async def _stream(ctx: ServingContext, req: CompletionRequest, request_id: str, model: str,
                  tracked: list[TrackedRequest], echoes: list[str] | None) -> AsyncIterator[str]:
    created = int(time.time())
    deltas = DeltaTracker()
    echoed: set[int] = set()
    finals: list[RequestOutput] = []
    try:
        async for i, out in merge(tracked, stream_cut(ctx)):
            choices = []
            for c in out.outputs:
                index = i * req.n + c.index
                d = deltas.delta(index, c)
                if d.empty:
                    continue
                text, ids, lps, offset = d.text, d.token_ids, d.logprobs, d.text_offset
                if echoes is not None:
                    # The prompt goes out once, in front of the choice's first delta.
                    if index not in echoed:
                        echoed.add(index)
                        prompt_lps = out.prompt_logprobs if req.logprobs is not None else None
                        text = echoes[i] + text
                        ids = list(out.prompt_token_ids) + list(ids)
                        lps = (list(prompt_lps) + list(lps)) if lps is not None and prompt_lps is not None else lps
                    else:
                        offset += len(echoes[i])
                choices.append(await _choice(ctx, req, index, text, ids, lps, offset,
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
