"""The bench's memory pass for one method at one bound, in a process of its own
(runner.measure_memory_here): python -m gradzip.bench.memory_child JOB METHOD PROBE BOUND
prints the peak in bytes."""
from __future__ import annotations

import sys

from ..allocator import one_malloc_arena
from .runner import measure_memory_here

if __name__ == "__main__":
    one_malloc_arena()  # as the `gradzip` command runs, for every method alike
    print(measure_memory_here(*sys.argv[1:5]))
