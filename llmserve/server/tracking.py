"""TrackedRequest: one engine request as the server reads it, timed as it goes.

It observes inter-token latency as outputs arrive and, when the request ends (finished, or
closed early by a disconnect or an error), records its metrics and its one log line, once.
"""
from __future__ import annotations

import time

from llmserve.engine.async_engine import RequestStream
from llmserve.outputs import RequestOutput
from llmserve.server.metrics import FinishedRequest, ServerMetrics
from llmserve.server.request_log import log_finished


class TrackedRequest:
    def __init__(self, stream: RequestStream, metrics: ServerMetrics, arrival_time: float,
                 num_prompt_tokens: int) -> None:
        self.stream = stream
        self.metrics = metrics
        self.arrival_time = arrival_time
        self.num_prompt_tokens = num_prompt_tokens
        self.last: RequestOutput | None = None
        self._tokens = 0  # the longest completion's length so far: one token per step
        self._generated = 0  # tokens of all completions so far, counted as they arrive
        self._last_token_time: float | None = None
        self._recorded = False

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    def __aiter__(self) -> TrackedRequest:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self.stream.__anext__()
        now = time.monotonic()
        tokens = max((len(c.token_ids) for c in out.outputs), default=0)
        generated = sum(len(c.token_ids) for c in out.outputs)
        if generated > self._generated:  # live, so a scrape's tokens/s follows the stream, not its end
            self.metrics.observe_generated(generated - self._generated)
            self._generated = generated
        if tokens > self._tokens:
            if self._last_token_time is not None:
                self.metrics.observe_inter_token(now - self._last_token_time, tokens - self._tokens)
            elif tokens > 1:  # tokens that came together with the first one: no gap between them
                self.metrics.observe_inter_token(0.0, tokens - 1)
            self._tokens, self._last_token_time = tokens, now
        self.last = out
        if out.finished:
            self._record()
        return out

    async def final(self) -> RequestOutput:
        """Read to the end and return the finished output."""
        async for _ in self:
            pass
        assert self.last is not None and self.last.finished
        return self.last

    def close(self) -> None:
        """Abort the request if it is still going and record it. Safe to call more than once."""
        self.stream.close()
        self._record()

    def withdraw(self, num_sequences: int) -> None:
        """Abort a request that was admitted but will not run, because another prompt of its batch
        was refused: it is counted as withdrawn, not as a finished (aborted) completion."""
        self.stream.close()
        if not self._recorded:
            self._recorded = True
            self.metrics.observe_withdrawn(num_sequences)

    def _record(self) -> None:
        if self._recorded:
            return
        self._recorded = True
        out, now = self.last, time.monotonic()
        m = out.metrics if out is not None else {}
        finished_time = m.get("finished_time", now)
        reasons = tuple(c.finish_reason or "abort" for c in out.outputs) if out is not None else ("abort",)
        record = FinishedRequest(
            request_id=self.request_id,
            prompt_tokens=self.num_prompt_tokens,
            output_tokens=sum(len(c.token_ids) for c in out.outputs) if out is not None else 0,
            cached_tokens=out.num_cached_tokens if out is not None else 0,
            finish_reasons=reasons,
            queue_s=_since(self.arrival_time, m.get("first_scheduled_time")),
            ttft_s=_since(self.arrival_time, m.get("first_token_time")),
            e2e_s=max(0.0, finished_time - self.arrival_time),
            draft_tokens=out.num_draft_tokens if out is not None else 0,
            accepted_tokens=out.num_accepted_tokens if out is not None else 0,
        )
        self.metrics.observe_finished(record)
        log_finished(record)


def _since(start: float, t: float | None) -> float | None:
    return None if t is None else max(0.0, t - start)
