"""How much a second thread can give on this machine: the ceiling of gradzip's thread scaling.

Times two kinds of work on one thread and on two (medians of many alternating runs):
- a compute-bound loop (square roots), split in two;
- a streaming pass (read one array, write another, as gradzip's quantizing, folding and
  hashing passes do), split in two;
each both through gradzip's own thread pool (parallel.each, what the codec uses) and through
numba's prange (its OpenMP or TBB layer, which gradzip does not use), so the pool's hand-off
cost shows beside the machine's own limit.

    python benchmarks/threads_probe.py
"""
from __future__ import annotations

import statistics
import time

import numba
import numpy as np
from numba import prange

from gradzip.parallel import available_cpus, each


@numba.njit(nogil=True)
def _roots(start, stop):
    total = 0.0
    for i in range(start, stop):
        total += np.sqrt(np.float64(i))
    return total


@numba.njit(nogil=True)
def _stream(source, target):
    for i in range(source.size):
        target[i] = source[i] * np.float32(1.5)


@numba.njit(nogil=True, parallel=True)
def _roots_prange(n, parts, out):
    for part in prange(parts):
        out[part] = _roots(part * n // parts, (part + 1) * n // parts)


@numba.njit(nogil=True, parallel=True)
def _stream_prange(source, target, parts):
    for part in prange(parts):
        a, b = part * source.size // parts, (part + 1) * source.size // parts
        _stream(source[a:b], target[a:b])


def _best(calls: dict, repeats: int) -> dict:
    """Median time of each call, the calls alternating."""
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    threads = 2
    print(f"{available_cpus()} CPUs available; numba threading layer after the first prange call:", end=" ")
    out = np.zeros(threads)
    _roots_prange(1000, threads, out)
    print(numba.threading_layer())
    print(f"{'work':34s} {'1 thread':>10s} {'pool, 2':>10s} {'prange, 2':>10s}")
    for n in (30_000, 300_000, 3_000_000):
        halves = [(0, n // 2), (n // 2, n)]
        result = _best({
            "one": lambda: each(lambda span: _roots(*span), halves, 1),
            "pool": lambda: each(lambda span: _roots(*span), halves, threads),
            "prange": lambda: _roots_prange(n, threads, out),
        }, 200)
        print(f"{'square roots, ' + format(n, ',') + ' of them':34s} "
              + " ".join(f"{result[k] * 1e6:8.0f}us" for k in ("one", "pool", "prange")))
    for mib in (1, 4, 16, 64):
        source = np.ones(mib << 18, np.float32)
        target = np.empty_like(source)
        half = source.size // 2
        spans = [(0, half), (half, source.size)]

        def split(span, source=source, target=target):
            _stream(source[span[0]:span[1]], target[span[0]:span[1]])

        result = _best({
            "one": lambda: _stream(source, target),
            "pool": lambda: each(split, spans, threads),
            "prange": lambda: _stream_prange(source, target, threads),
        }, 60)
        print(f"{'streaming pass, ' + str(mib) + ' MiB in':34s} "
              + " ".join(f"{result[k] * 1e6:8.0f}us" for k in ("one", "pool", "prange")))


if __name__ == "__main__":
    main()
