"""One glibc malloc arena for gradzip's processes.

glibc gives each thread that allocates its own arena (up to eight per core), and memory a
thread frees stays in its arena for that thread: with two threads, a compression of the
cnn5fc corpus sequence (a 4 MiB layer and its 4 MiB working arrays on two threads) kept
26-33 MiB resident at its peaks, against 18-23 MiB on one thread and a target of 25.7 MiB.
With one arena its two-thread peaks were 19.5-22 MiB, at the same speed (10 rounds on two
threads: 542-573 ms against 536-553 ms, three runs each). A fixed mmap threshold would also
return the big arrays, but at the price of page faults on every one (decompression 1.4x
slower).
"""
from __future__ import annotations

import ctypes
import os
import sys

_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def one_malloc_arena() -> None:
    """Ask glibc for one malloc arena unless the user set MALLOC_ARENA_MAX (which glibc read
    at start-up); only on Linux, and a no-op under a C library without the setting. Takes
    effect for the threads' later allocations, so call it before gradzip's threads start."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return
    mallopt(_M_ARENA_MAX, 1)
