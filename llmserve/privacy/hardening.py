"""Process hardening for private mode: no core dumps, not dumpable (no ptrace or /proc/<pid>/mem
reads by other processes of the same user), memory locked against swap where the OS allows.

Each step is tried and reported; what the OS refuses is logged plainly (swap locking needs
CAP_IPC_LOCK or a large RLIMIT_MEMLOCK), never silently skipped.
"""
from __future__ import annotations

import ctypes
import logging
import os
import resource
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

PR_SET_DUMPABLE, PR_GET_DUMPABLE = 4, 3
MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4


@dataclass
class Hardening:
    core_dumps_off: bool = False
    not_dumpable: bool = False
    memory_locked: bool = False
    problems: list[str] = field(default_factory=list)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def harden_process(lock_memory: bool = True) -> Hardening:
    result = Hardening()
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        result.core_dumps_off = True
    except (ValueError, OSError) as e:
        result.problems.append(f"core dumps stay possible: {e}")
    libc = _libc()
    if libc is None:
        result.problems.append("not Linux/glibc: the process stays dumpable and its memory swappable")
    else:
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            result.not_dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0
        else:
            result.problems.append(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")
        # On fault: pages lock as they are touched, so start-up does not fault in every mapping.
        if lock_memory and libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
            result.memory_locked = True
        elif lock_memory:
            result.problems.append(f"memory not locked against swap (mlockall: {os.strerror(ctypes.get_errno())}; "
                                   "needs CAP_IPC_LOCK or a larger RLIMIT_MEMLOCK)")
    for problem in result.problems:
        logger.warning("private mode: %s", problem)
    return result
