"""Element ranges of one large tensor on several threads: the kernels release the GIL, and
every split is of element-wise work (or of independent rANS segments), so the results do
not depend on the thread count.

Tasks handed to these pools never submit to them again (that could deadlock a full pool).
Also here: how many CPUs the process may use (available_cpus), the default thread count.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

# Below this many elements a range is not worth a thread's hand-off (a numba call on 2^17
# float32 elements of the state update takes about 0.3 ms; the hand-off tens of microseconds).
MIN_SPAN = 1 << 17

_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _forget_pools_in_a_child() -> None:
    """A forked child has none of its parent's pool threads: a task queued to their pools
    would wait forever (and a lock held at the fork would stay held)."""
    global _POOLS_LOCK
    _POOLS.clear()
    _POOLS_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_a_child)


def available_cpus() -> int:
    """The CPUs this process may use, at least 1: the default thread count. Its affinity
    mask (so `taskset` and a container's CPU set count; os.cpu_count() gives the machine's),
    capped by a cgroup CPU quota rounded up (a container started with --cpus=2, or a
    Kubernetes CPU limit, sees every CPU of its host in its mask)."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (no affinity call on macOS and Windows)
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup", own_cgroups: str = "/proc/self/cgroup") -> float | None:
    """CPUs' worth of time the process's cgroup may use per period (cgroup v2's cpu.max, or
    v1's cpu.cfs_quota_us over cpu.cfs_period_us), or None: no quota, or none readable (not
    Linux, no cgroup file system). Looked up under the process's own cgroup, then the root (a
    container usually sees its own cgroup as the root)."""
    try:
        with open(own_cgroups) as file:
            entries = [line.rstrip("\n").split(":", 2) for line in file]
    except OSError:
        return None
    candidates = []
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        path = path.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates += [(os.path.join(root, path, "cpu.max"), None), (os.path.join(root, "cpu.max"), None)]
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (os.path.join(root, controllers, path), os.path.join(root, controllers), os.path.join(root, "cpu")):
                candidates.append((os.path.join(base, "cpu.cfs_quota_us"), os.path.join(base, "cpu.cfs_period_us")))
    for quota_path, period_path in candidates:
        try:
            with open(quota_path) as file:
                fields = file.read().split()
            if period_path is not None:
                with open(period_path) as file:
                    fields = fields[:1] + file.read().split()[:1]
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            quota, period = int(quota), int(period)
        except (OSError, ValueError, IndexError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


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
