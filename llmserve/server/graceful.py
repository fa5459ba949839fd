"""uvicorn.Server whose SIGTERM/SIGINT handling ends with exit status 0.

uvicorn already stops accepting on a signal and waits (up to timeout_graceful_shutdown) for
running responses to finish, but afterwards it re-raises the signal, so the process would die by
SIGTERM (status 143). Here the signal only starts the graceful shutdown.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import uvicorn


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None = None,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._on_started = on_started

    def handle_exit(self, sig: int, frame) -> None:
        if self._on_exit is not None:
            self._on_exit()
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

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()
