"""CPU thread count for the engine.

OpenMP threads spin and wait for each other at every op: when another process keeps a core busy,
a thread pool as wide as the machine runs many times slower than a narrower one. So at start the
engine measures how many cores other processes are using and leaves those to them.
LLMSERVE_NUM_THREADS overrides the choice.
"""
from __future__ import annotations

import logging
import os
import time

import torch

logger = logging.getLogger(__name__)


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) jiffies over all cores, from /proc/stat; None where there is no such file."""
    try:
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window: float = 0.2) -> float | None:
    """Cores kept busy by other processes over a short window (this process sleeps meanwhile)."""
    a = _cpu_times()
    time.sleep(window)
    b = _cpu_times()
    if a is None or b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)


def configure_threads() -> int:
    env = os.environ.get("LLMSERVE_NUM_THREADS")
    if env:
        torch.set_num_threads(max(1, int(env)))
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores()
    want = cores if busy is None else max(1, cores - int(busy + 0.5))
    want = min(want, torch.get_num_threads())  # never more than the user or torch already allows
    if want != torch.get_num_threads():
        logger.info("%.1f of %d cores are busy with other work: using %d threads", busy or 0.0, cores, want)
        torch.set_num_threads(want)
    return want
