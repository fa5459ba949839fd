"""Server-sent events, merging a batch's streams, and noticing a client that went away.

A streaming client that disconnects is noticed by Starlette, which cancels the response's body
iterator: the CancelledError runs our `finally` blocks, which close the requests (abort, blocks
freed before the next step). A non-streaming response has no body to cancel, so its handler
races the generation against the ASGI disconnect message instead.

At shutdown, streams still running when the grace period ends would be cancelled mid-body (no
error event, no [DONE]: a cancelled response cannot send any more). `cut_streams(ctx)`, called
by the shutdown path shortly before that, ends every open stream of the app properly instead: an
OpenAI-style error event (503) and then `[DONE]`.
"""
from __future__ import annotations

import asyncio
import json
import weakref
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.requests import Request

from llmserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from llmserve.server.errors import APIError, from_engine_error
from llmserve.server.tracking import TrackedRequest

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    pass


def sse(event: BaseModel | dict) -> str:
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_error(e: BaseException) -> str:
    """An error after the stream began: OpenAI's error object as one event (no content in it)."""
    return sse(from_engine_error(e).body())


class StreamCut:
    """An app's shutdown signal for its open streams; `cut()` may be called from any thread."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's loop, once a stream used it

    def cut(self) -> None:
        if self.loop is None:  # no stream has waited on it yet
            self.event.set()
            return
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the event loop is closed: no stream is left to end
            pass


_CUTS: weakref.WeakKeyDictionary[object, StreamCut] = weakref.WeakKeyDictionary()


def stream_cut(ctx: object) -> StreamCut:
    """ctx's (the ServingContext's) stream cut; call it on the app's event loop."""
    cut = _CUTS.setdefault(ctx, StreamCut())
    if cut.loop is None:
        cut.loop = asyncio.get_running_loop()
    return cut


def cut_streams(ctx: object) -> None:
    """End every open stream of ctx with a 503 error event and [DONE]; thread-safe. Streams
    started afterwards end the same way at once."""
    _CUTS.setdefault(ctx, StreamCut()).cut()


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; the response was cut short.", "service_unavailable_error",
                    code="server_shutdown")


async def merge(requests: list[TrackedRequest], cut: StreamCut | None = None
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(index, output) from every request as it comes. Closing the iterator closes them all. When
    cut is set (the server shuts down), it raises the 503 shutting_down() error."""
    try:
        if len(requests) == 1 and cut is None:
            async for out in requests[0]:
                yield 0, out
            return
        if cut is not None and cut.event.is_set():
            raise shutting_down()
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, r: TrackedRequest) -> None:
            try:
                async for out in r:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer, who raises it
                queue.put_nowait((i, e))

        async def watch(c: StreamCut) -> None:
            await c.event.wait()
            queue.put_nowait((-1, shutting_down()))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        if cut is not None:
            tasks.append(asyncio.create_task(watch(cut)))
        try:
            remaining = len(requests)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for r in requests:
            r.close()


def close_after(requests: list[TrackedRequest]) -> BackgroundTask:
    """Runs once the response ends, however it ends: a client gone before the body iterator even
    started never runs the iterator's `finally`."""
    async def close() -> None:  # async: runs on the event loop, not in a worker thread
        for r in requests:
            r.close()
    return BackgroundTask(close)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work unless the client disconnects first; then cancel it and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        for t in (task, watcher):
            t.cancel()
            # A cancelled gather() ends with its CancelledError set as an exception, which asyncio
            # logs as "never retrieved" unless someone reads it: read it when it comes.
            t.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _wait_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass(repr=False)
class Delta:
    """What one choice gained since the last event: text, token ids, their logprobs, and whether
    it just finished."""
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    text_offset: int  # characters of this choice sent before this delta
    finished: bool

    def __repr__(self) -> str:  # output text and ids stay out of logs and tracebacks
        return (f"Delta(chars={len(self.text)}, tokens={len(self.token_ids)}, text_offset={self.text_offset}, "
                f"finished={self.finished})")

    @property
    def empty(self) -> bool:
        return not self.text and not self.finished and not (self.logprobs and self.token_ids)


class DeltaTracker:
    """Turns cumulative CompletionOutputs into per-choice deltas. The cumulative text already holds
    back a possible stop-string prefix, so a delta never has to be taken back."""

    def __init__(self) -> None:
        self._chars: dict[int, int] = {}
        self._tokens: dict[int, int] = {}
        self._finished: set[int] = set()

    def delta(self, index: int, c: CompletionOutput) -> Delta:
        chars, tokens = self._chars.get(index, 0), self._tokens.get(index, 0)
        finished = c.finish_reason is not None and index not in self._finished
        self._chars[index], self._tokens[index] = len(c.text), len(c.token_ids)
        if finished:
            self._finished.add(index)
        return Delta(c.text[chars:], c.token_ids[tokens:], None if c.logprobs is None else c.logprobs[tokens:],
                     chars, finished)
