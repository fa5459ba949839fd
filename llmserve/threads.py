"""CPU thread count for the engine.

OpenMP threads spin and wait for each other at every op: when another process keeps a core busy,
a thread pool as wide as the machine runs many times slower (measured here: 20 ms decode steps
became 700 ms). So the engine leaves cores that other processes use to them: it measures at start
and re-measures every few seconds while it runs (ThreadGovernor.tick, called once per step).
LLMSERVE_NUM_THREADS fixes the count instead.
"""
from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)
_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds spent busy on all cores since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / _HZ


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ThreadGovernor:
    """Keeps torch's thread count at the cores not used by other processes."""

    def __init__(self, period: float = 2.0) -> None:
        self.period = period
        self.fixed = bool(os.environ.get("LLMSERVE_NUM_THREADS"))
        self.max_threads = min(_available_cores(), torch.get_num_threads())
        if self.fixed:
            torch.set_num_threads(max(1, int(os.environ["LLMSERVE_NUM_THREADS"])))
        self._mark = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        return time.monotonic(), _busy_seconds(), _own_seconds()

    def _others_busy(self, start, end) -> float | None:
        (t0, busy0, own0), (t1, busy1, own1) = start, end
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

    def calibrate(self, window: float = 0.2) -> int:
        """Measure over a short window (the engine is idle meanwhile) and set the thread count."""
        start = self._sample()
        time.sleep(window)
        return self._apply(self._others_busy(start, self._sample()))

    def tick(self) -> None:
        """Re-measure once per period; cheap enough to call every step."""
        if self.fixed or time.monotonic() - self._mark[0] < self.period:
            return
        now = self._sample()
        others = self._others_busy(self._mark, now)
        self._mark = now
        self._apply(others)

    def _apply(self, others: float | None) -> int:
        if self.fixed or others is None:
            return torch.get_num_threads()
        want = max(1, min(self.max_threads, _available_cores() - int(others + 0.5)))
        if want != torch.get_num_threads():
            logger.info("other processes keep %.1f cores busy: using %d threads", others, want)
            torch.set_num_threads(want)
        return want
