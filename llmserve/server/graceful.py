"""uvicorn.Server whose SIGTERM/SIGINT handling drains first and ends with exit status 0.

On the first signal the server starts draining: `/ready` answers 503 (on_exit) while the socket
still accepts, for `drain_delay_s`, so a load balancer that polls readiness stops sending before
connections are refused. Then uvicorn stops accepting and waits (up to timeout_graceful_shutdown)
for running responses to finish. A second signal skips what is left of the delay.

Streams still running when that grace period is about to end are told so (on_grace_ending, a
second before), so they can end with an error event instead of being cancelled mid-body.

uvicorn would re-raise the signal afterwards, so the process would die by SIGTERM (status 143);
here the signal only starts the graceful shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn

GRACE_MARGIN_S = 1.0  # how long before the grace period ends streams are told to finish


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None,
                 on_started: Callable[[], None] | None = None, drain_delay_s: float = 0.0,
                 on_grace_ending: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._on_started = on_started
        self._on_grace_ending = on_grace_ending
        self.drain_delay_s = drain_delay_s
        self._drain_timer: threading.Timer | None = None
        self._lock = threading.Lock()  # a signal and the timer thread may both end the delay

    def handle_exit(self, sig: int, frame) -> None:
        with self._lock:
            first = self._drain_timer is None
            if first:
                if self._on_exit is not None:
                    self._on_exit()
                if self.drain_delay_s > 0 and not self.should_exit:
                    self._drain_timer = threading.Timer(self.drain_delay_s, self._stop_accepting, (sig, frame))
                    self._drain_timer.daemon = True
                    self._drain_timer.start()
                    return
            elif self._drain_timer is not None:
                self._drain_timer.cancel()
        super().handle_exit(sig, frame)

    def _stop_accepting(self, sig: int, frame) -> None:
        with self._lock:
            if not self.should_exit:
                super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    async def shutdown(self, sockets=None) -> None:
        grace = self.config.timeout_graceful_shutdown
        timer = None
        if self._on_grace_ending is not None and grace is not None:
            delay = max(0.0, grace - min(GRACE_MARGIN_S, grace / 2))
            timer = asyncio.get_running_loop().call_later(delay, self._on_grace_ending)
        try:
            await super().shutdown(sockets)
        finally:
            if timer is not None:
                timer.cancel()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()
