"""One BLAS thread for gradzip's processes.

gradzip's BLAS calls (the low-rank fit's matrix products, the decoder's low-rank offset) run
inside its own threads. With more than one OpenBLAS thread, OpenBLAS's idle workers spin on
the other cores: a single-threaded compress of a 3.2M-parameter transformer round used 1.8 s
of CPU in 0.9 s, and two gradzip threads then ran slower than one (1.8 s against 0.9 s);
with one OpenBLAS thread the CPU time equals the wall time (0.74 s) and two threads take
0.63-0.72 s. OpenBLAS reads this thread count when numpy loads, so a process sets it before
that (threadpoolctl can lower it later, once numpy is loaded, which the bench also does).
"""
from __future__ import annotations

import os
import sys


def one_blas_thread() -> None:
    """Ask OpenBLAS for one thread unless the user set OPENBLAS_NUM_THREADS; no effect once
    numpy is loaded (the `gradzip` command and benchmarks/run.py call this first thing)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
