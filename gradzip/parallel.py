"""Element ranges of one large tensor on several threads: the kernels release the GIL, and
every split is of element-wise work (or of independent rANS segments), so the results do
not depend on the thread count.

Tasks handed to these pools never submit to them again (that could deadlock a full pool).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

# Below this many elements a range is not worth a thread's hand-off (a numba call on 2^17
# float32 elements of the state update takes about 0.3 ms; the hand-off tens of microseconds).
MIN_SPAN = 1 << 17

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, so `taskset` and container CPU
    sets count; os.cpu_count() gives the machine's), at least 1: the default thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (no affinity call on macOS and Windows)
        return os.cpu_count() or 1


def each(function, items, threads: int) -> list:
    """function over items, on up to `threads` threads, results in order. The pools live as
    long as the process: starting one per tensor cost a fifth of the gain."""
    if threads <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gradzip")
    return list(pool.map(function, items))


def spans(n: int, threads: int, align: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n: one per thread, each at least MIN_SPAN long and
    starting at a multiple of align (a row length, for kernels that work row by row)."""
    count = max(1, min(threads, n // MIN_SPAN))
    if count == 1:
        return [(0, n)]
    step = -(-n // count)
    step = -(-step // align) * align
    return [(start, min(start + step, n)) for start in range(0, n, step)]
