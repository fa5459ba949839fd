"""AsyncLLMEngine: the LLMEngine loop on its own thread, one async stream per request.

The loop thread builds the LLMEngine and is the only one that runs it. Everything else talks to it
through one thread-safe inbox (adds and aborts) and gets answers back on its own asyncio loop with
`call_soon_threadsafe`: admission results on a future, cumulative RequestOutputs in a one-slot
stream (the newest output replaces one not yet read, so a slow reader holds at most one).
Between two steps the loop drains the inbox, so an abort frees the request's blocks before the
next step runs. When idle it sleeps on an event; no busy spin.

A failed step (one that raises, or whose forward the engine caught failing) fails only the
requests it concerned; the loop goes on, and gives up (every request then fails with
EngineDeadError) only after several failed steps in a row. The server's tokenizer is a copy of
the engine's, so the loop thread's tokenizer is never used by another thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from llmserve.config import EngineConfig
from llmserve.engine.engine import LLMEngine
from llmserve.errors import EngineDeadError, EngineStepError, LLMServeError
from llmserve.outputs import RequestOutput
from llmserve.sampling_params import SamplingParams
from llmserve.structured import StructuredOutputsParams
from llmserve.tokenizer import clone_tokenizer

logger = logging.getLogger(__name__)

IDLE_TICK_S = 1.0  # an idle loop still wakes this often, so its heartbeat stays fresh
DEFAULT_MAX_WAITING_REQUESTS = 256  # when the config sets no bound: no queue is unbounded
# Failed steps in a row before the loop gives up: one failure may be transient (an out-of-memory
# on one batch), several in a row mean the device or the engine is broken.
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineOverloadedError(LLMServeError):
    """The waiting queue is at its bound; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the loop thread publishes after every iteration; read from any thread."""
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Speculative decoding (vLLM's spec_decode_num_*): verify runs, draft tokens, accepted ones.
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    # Replicas (cluster/): one (num_running, num_waiting, kv_usage, serving) per replica; requests
    # moved with their KV (prefill -> decode, migrations), the seconds and bytes that took; restarts.
    replicas: tuple[tuple[int, int, float, bool], ...] = ()
    kv_transfers: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_bytes: int = 0
    replica_restarts: int = 0
    autoscale_outs: int = 0  # the autoscaler's decisions (cluster/autoscaler.py)
    autoscale_ins: int = 0
    # Replica steps that ran requests, their seconds, and how long replicas sat with work waiting for
    # the front end's next call: the share of the replicas' time the front end costs.
    replica_steps: int = 0
    replica_step_seconds: float = 0.0
    replica_step_cpu_seconds: float = 0.0
    replica_front_wait_seconds: float = 0.0
    # The KV disk tier: prompt tokens read back from it; bytes written, read and held.
    prefix_cache_disk_hits: int = 0
    kv_offload_bytes_written: int = 0
    kv_offload_bytes_read: int = 0
    kv_offload_bytes_stored: int = 0


_TIER_STATS = ("prefix_cache_disk_hits", "kv_offload_bytes_written", "kv_offload_bytes_read",
               "kv_offload_bytes_stored")


@dataclass(frozen=True)
class EngineHealth:
    alive: bool  # the loop runs, and its last step that had work did not fail
    last_heartbeat_age_s: float  # seconds since the loop last came round
    error: str | None = None  # the exception type that killed the loop, or that failed the last step
    accepting: bool = False  # the loop takes new requests (even right after a failed step)
    consecutive_step_failures: int = 0


def _is_terminal(item: RequestOutput | BaseException | None) -> bool:
    return isinstance(item, BaseException) or (item is not None and item.finished)


class RequestStream:
    """The consumer side of one request. The loop thread pushes into it; one coroutine reads it.

    Outputs are cumulative, so the stream keeps one slot: a push replaces an output the reader has
    not taken yet (a slow client holds one output, not one per step). An error or the final output
    is never replaced: it is the last thing the reader gets."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self._loop = loop
        self._abort = abort
        self._slot: RequestOutput | BaseException | None = None  # consumer's loop only
        self._ready = asyncio.Event()  # set while the slot holds something
        self.admitted: asyncio.Future[None] = loop.create_future()
        self.finished = False

    # -- called on the loop thread --
    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def push(self, item: RequestOutput | BaseException) -> None:
        self._call(self._put, item)

    def admit(self, error: BaseException | None) -> None:
        self._call(self._set_admitted, error)

    def _set_admitted(self, error: BaseException | None) -> None:
        if self.admitted.done():
            return
        if error is None:
            self.admitted.set_result(None)
        else:
            self.admitted.set_exception(error)

    # -- called on the consumer's event loop --
    def _put(self, item: RequestOutput | BaseException) -> None:
        if self.finished or _is_terminal(self._slot):
            return  # the reader has left, or the last word is already waiting for it
        self._slot = item
        self._ready.set()

    @property
    def num_pending(self) -> int:
        """Outputs pushed but not yet read: 0 or 1, however slow the reader."""
        return 0 if self._slot is None else 1

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        return await self.next()

    def close(self) -> None:
        """Abort the request unless it already ended. Call it when the consumer leaves early."""
        if not self.finished:
            self.finished = True
            self._slot = None
            self._abort(self.request_id)

    async def next(self) -> RequestOutput:
        """The newest cumulative output; it holds every output before it."""
        while self._slot is None:
            await self._ready.wait()
        item, self._slot = self._slot, None
        self._ready.clear()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


@dataclass(repr=False)
class _Add:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    priority: int
    cache_salt: str | None
    arrival_time: float

    def __repr__(self) -> str:  # the prompt's text and ids (and the tenant's salt) stay out of logs
        return (f"_Add(request_id={self.stream.request_id!r}, prompt_tokens={len(self.prompt_token_ids)}, "
                f"priority={self.priority})")


@dataclass
class _Abort:
    request_id: str


def _ended_in_error(out: RequestOutput) -> bool:
    return out.finished and any(c.finish_reason == "error" for c in out.outputs)


class AsyncLLMEngine:
    def __init__(self, build: Callable[[], LLMEngine], max_waiting_requests: int = DEFAULT_MAX_WAITING_REQUESTS) -> None:
        """Starts the loop thread, which builds the engine with `build()` and then serves it; returns
        once the engine is built, or raises what building it raised.

        The engine is built on the loop thread, not the caller's, so every torch op runs on one
        thread: when a second thread also runs OpenMP regions, libgomp counts more threads than
        cores and stops spinning between regions, and each of the hundreds of parallel regions of
        a decode step then waits for a sleeping worker (measured: 12.5 ms steps became 30 ms)."""
        self.max_waiting_requests = max_waiting_requests
        self.engine: LLMEngine | None = None
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # orders "is the loop dead?" against putting into the inbox
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._stats = EngineStats()
        self._heartbeat = time.monotonic()
        self._error: str | None = None  # set once the loop has died: it serves nothing more
        self._step_error: str | None = None  # the type of the last step failure, until a step succeeds
        self._step_failures = 0  # failed steps in a row
        self._client_tokenizer = None  # the callers' own copy; the loop thread uses the engine's
        # Grammar compilation runs here, off the loop thread and off the event loop.
        self._grammar_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmserve-grammar")
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(build,), name="llmserve-engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        bound = config.max_waiting_requests
        if config.replicas > 1 or config.autoscale:  # engines on Ray behind the same interface (cluster/replicas.py)
            from llmserve.cluster.replicas import ReplicatedEngine

            return cls(lambda: ReplicatedEngine(config), DEFAULT_MAX_WAITING_REQUESTS if bound is None else bound)
        return cls(lambda: LLMEngine(config), DEFAULT_MAX_WAITING_REQUESTS if bound is None else bound)

    # ---- read-only facts for the server (immutable after start) -------------------------
    @property
    def tokenizer(self):
        """A copy of the engine's tokenizer for the caller (the server), never used by the loop
        thread: HF fast tokenizers fail ("Already borrowed") when two threads use one at once. The
        caller must still not use this copy from two threads at once."""
        return self._client_tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def stats(self) -> EngineStats:
        return self._stats

    def health(self) -> EngineHealth:
        accepting = self._thread.is_alive() and self._error is None and not self._stop.is_set()
        failures = self._step_failures
        return EngineHealth(alive=accepting and failures == 0,
                            last_heartbeat_age_s=time.monotonic() - self._heartbeat,
                            error=self._error or (self._step_error if failures else None),
                            accepting=accepting, consecutive_step_failures=failures)

    # ---- requests -----------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                          prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                          arrival_time: float | None = None) -> RequestStream:
        """Admit a request and return its stream. Validation and overload errors raise here,
        before any output, so a server can still answer with a 4xx status. The caller must
        `close()` the stream if it stops reading before the request finishes."""
        stream = RequestStream(request_id, asyncio.get_running_loop(), self.abort)
        now = time.monotonic() if arrival_time is None else arrival_time
        self._submit(_Add(stream, list(prompt_token_ids), params, prompt, priority, cache_salt, now))
        try:
            await stream.admitted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    async def compile_grammar(self, so: StructuredOutputsParams) -> None:
        """Compile so's grammar on the grammar thread (cached by spec), so that admitting the request
        on the loop thread finds it compiled. Raises GrammarError when it cannot be compiled."""
        await asyncio.get_running_loop().run_in_executor(self._grammar_pool, self.engine.grammars.compile, so)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str, *,
                       prompt: str | None = None, priority: int = 0, cache_salt: str | None = None,
                       arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs until the request finishes. Stopping the iteration aborts it."""
        stream = await self.add_request(request_id, prompt_token_ids, params, prompt=prompt, priority=priority,
                                        cache_salt=cache_salt, arrival_time=arrival_time)
        try:
            async for out in stream:
                yield out
        finally:  # the consumer left early (disconnect, cancellation, error): free the request
            stream.close()

    def abort(self, request_id: str) -> None:
        """Thread-safe and non-blocking: the loop frees the request's blocks before its next step."""
        try:
            self._submit(_Abort(request_id))
        except EngineDeadError:
            pass  # a dead engine holds no requests to free

    def _submit(self, cmd: _Add | _Abort) -> None:
        with self._lock:
            if self._error is not None or self._stop.is_set():
                raise EngineDeadError("the engine loop is not running")
            self._inbox.put(cmd)
        self._wake.set()

    # ---- the loop thread ----------------------------------------------------------------
    def _run(self, build: Callable[[], LLMEngine]) -> None:
        try:
            self.engine = build()
            self._client_tokenizer = clone_tokenizer(self.engine.tokenizer)  # before any step uses it
            self.engine.grammars.prepare()  # reads the tokenizer here, on its own thread
        except BaseException as e:  # noqa: BLE001 - handed to the constructor, which raises it
            self._build_error = e
            self._error = type(e).__name__
            return
        finally:
            self._built.set()
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(IDLE_TICK_S)
                self._wake.clear()  # before draining: a put after this sets it again
                aborted = self._drain_inbox()
                # After an abort, step even when idle: it hands back (and so drops) the engine's
                # record of the aborted output instead of keeping it until the next request.
                if aborted or self.engine.has_unfinished_requests():
                    self._step()
                elif hasattr(self.engine, "tick"):  # replicas: the autoscaler decides when idle too
                    self.engine.tick()
                self._publish()
        except BaseException as e:  # noqa: BLE001 - any failure must release every waiting client
            self._die(e)

    def _step(self) -> None:
        """One engine step. A failed step ends the requests in it, not the loop: the engine either
        raises (then every request it holds is failed here) or ends them itself with finish reason
        "error" (LLMEngine catches a failing forward). Several failed steps in a row end the loop."""
        had_work = self.engine.has_unfinished_requests()
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - KeyboardInterrupt and the like still end the loop
            if self._count_failure(type(e).__name__):
                raise  # not one bad batch: the engine is broken, and _die says so
            self._fail_in_flight(e)
            return
        failed = self.engine.last_step_error is not None
        if failed and any(_ended_in_error(out) for out in outputs):
            if self._count_failure(self.engine.last_step_error):
                self._dispatch(outputs)
                raise EngineStepError(f"{MAX_CONSECUTIVE_STEP_FAILURES} engine steps in a row failed")
        elif had_work and not failed:
            # Only a step that ran requests proves the engine works again; one that merely handed
            # back aborted outputs proves nothing.
            self._step_failures, self._step_error = 0, None
        # Ended in error while no step failed: requests refused one by one (a replica's late refusal
        # of what the front end's checks let through). Their clients get an error; the engine works.
        self._dispatch(outputs, refused=not failed)

    def _count_failure(self, error_type: str) -> bool:
        """Record a failed step; True once the loop should give up."""
        self._step_failures += 1
        self._step_error = error_type
        return self._step_failures >= MAX_CONSECUTIVE_STEP_FAILURES

    def _fail_in_flight(self, e: Exception) -> None:
        """End every request the engine holds with EngineStepError and free its blocks. Requests
        still in the inbox were not in the failed step: they are added next round as usual."""
        # Stack frames but not the exception's message, which could quote request content.
        logger.error("engine step failed with %s (%d in a row); failing its %d requests\n%s", type(e).__name__,
                     self._step_failures, len(self._streams), "".join(traceback.format_tb(e.__traceback__)))
        error = EngineStepError("an engine step failed")
        request_ids = list(self._streams)
        for stream in self._streams.values():
            stream.push(error)
        self._streams.clear()
        self.engine.abort_request(request_ids)  # if even this raises, the loop dies (_die)

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; True if anything was aborted."""
        aborted = False
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return aborted
            if isinstance(cmd, _Abort):
                aborted |= self._abort(cmd.request_id)
            else:
                self._add(cmd)

    def _add(self, cmd: _Add) -> None:
        rid = cmd.stream.request_id
        if self.engine.stats()["num_waiting"] >= self.max_waiting_requests:
            cmd.stream.admit(EngineOverloadedError("too many requests are waiting; retry later"))
            return
        try:
            self.engine.add_request(rid, cmd.prompt_token_ids, cmd.params, prompt=cmd.prompt,
                                    priority=cmd.priority, cache_salt=cmd.cache_salt, arrival_time=cmd.arrival_time)
        except LLMServeError as e:  # validation: the request is refused, the engine goes on
            cmd.stream.admit(e)
            return
        except Exception as e:  # a bug met by one request must not take the loop down with it
            logger.error("add_request failed with %s", type(e).__name__)
            self.engine.abort_request(rid)
            cmd.stream.admit(e)
            return
        self._streams[rid] = cmd.stream
        cmd.stream.admit(None)

    def _abort(self, request_id: str) -> bool:
        if self._streams.pop(request_id, None) is None:
            return False  # already finished, or never admitted
        self.engine.abort_request(request_id)
        return True

    def _dispatch(self, outputs: list[RequestOutput], refused: bool = False) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue  # aborted by its consumer, who no longer listens
            # The engine ends the requests of a step whose forward failed with finish reason
            # "error": their client gets the same error as when the step itself raises.
            if _ended_in_error(out):
                stream.push(EngineStepError("a replica refused the request" if refused else "an engine step failed"))
            else:
                stream.push(out)
            if out.finished:
                del self._streams[out.request_id]

    def _publish(self) -> None:
        s = self.engine.stats()
        self._stats = EngineStats(int(s["num_running"]), int(s["num_waiting"]), float(s["kv_usage"]),
                                  int(s["prefix_cache_queries"]), int(s["prefix_cache_hits"]),
                                  int(s["spec_decode_num_drafts"]), int(s["spec_decode_num_draft_tokens"]),
                                  int(s["spec_decode_num_accepted_tokens"]),
                                  *self._replica_stats(),
                                  **{k: int(s.get(k, 0)) for k in _TIER_STATS})
        self._heartbeat = time.monotonic()

    def _replica_stats(self) -> tuple:
        e = self.engine
        if not hasattr(e, "replica_stats"):
            return ()
        return (tuple(e.replica_stats()), e.transfers, e.transfer_s, e.transfer_bytes, e.restarts, e.scale_outs,
                e.scale_ins, e.steps_run, e.step_s, e.step_cpu_s, e.waited_s)

    def _die(self, e: BaseException) -> None:
        # Stack frames but not the exception's message, which could quote request content.
        logger.error("engine loop failed with %s; failing all requests\n%s", type(e).__name__,
                     "".join(traceback.format_tb(e.__traceback__)))
        with self._lock:
            # Steps the engine failed itself end the loop with our EngineStepError: name theirs.
            self._error = (self._step_error if isinstance(e, EngineStepError) else None) or type(e).__name__
        self._fail_all(EngineDeadError("the engine loop failed"))

    def _fail_all(self, error: EngineDeadError) -> None:
        """End every stream, admitted or still in the inbox, with error."""
        for stream in self._streams.values():
            stream.push(error)
        self._streams.clear()
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                cmd.stream.admit(error)

    # ---- shutdown -----------------------------------------------------------------------
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop thread. Requests still in flight end with EngineDeadError."""
        with self._lock:
            self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():  # stuck in a step: its streams stay its own
            logger.warning("engine loop did not stop within %.0f s", timeout)
            return
        self._fail_all(EngineDeadError("the engine was shut down"))
        if hasattr(self.engine, "shutdown"):  # replicas: their actors, and the Ray started for them
            self.engine.shutdown()
