"""Stale numba caches. numba keys a cached kernel on its own source file only, so a kernel
that calls or inlines one from another file keeps the old callee when only that file changed
(fold_round in predict/history.py inlines magnitude_stats from predict/magnitude.py); two
code paths could then build different states. So the package stamps the sizes and times of
its kernel files beside their caches and drops every cached kernel when the stamp differs.
pip installs rewrite every file, so this matters for development trees (an edit, a pull). A
cache elsewhere (NUMBA_CACHE_DIR, or a read-only package's) is left to numba's own rules."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# Every module that defines a numba kernel (tests/test_kernels.py checks the list).
KERNEL_MODULES = ("checksum.py", "entropy/huffman.py", "entropy/rans.py", "floats.py", "fused_decode.py", "fused_encode.py", "metrics.py",
                  "predict/context.py", "predict/history.py", "predict/linear.py", "predict/lowrank.py", "predict/magnitude.py",
                  "predict/sign.py", "quantize.py")
STAMP_NAME = "gradzip-kernels.stamp"


def sources_stamp(package: Path = PACKAGE) -> str:
    digest = hashlib.sha1()
    for name in KERNEL_MODULES:
        status = (package / name).stat()
        digest.update(f"{name}:{status.st_size}:{status.st_mtime_ns};".encode())
    return digest.hexdigest()


def drop_stale_kernels(package: Path = PACKAGE) -> bool:
    """Delete the package's cached kernels if its kernel sources changed since the cache was
    stamped (or it never was); True if it did."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    stamp_file = package / "__pycache__" / STAMP_NAME
    try:
        stamp = sources_stamp(package)
        if stamp_file.is_file() and stamp_file.read_text() == stamp:
            return False
        for cached in [*package.rglob("*.nbi"), *package.rglob("*.nbc")]:
            cached.unlink(missing_ok=True)
        stamp_file.parent.mkdir(exist_ok=True)
        stamp_file.write_text(stamp)
    except OSError:  # a read-only install: numba caches elsewhere, or not at all
        return False
    return True


def compiled_before(kernel) -> bool:
    """Whether numba's cache holds an index for this cached kernel wherever
    numba keeps it (beside the package, NUMBA_CACHE_DIR or its user-wide directory): False
    means its first call compiles it, and with it most of gradzip's kernels (about a minute
    with an empty cache), which the CLI then says. True where numba's cache cannot be asked
    (its layout is numba's own): no notice rather than a wrong one."""
    try:
        return os.path.exists(kernel._cache._cache_file._index_path)
    except (AttributeError, OSError):
        return True


def first_call_compiles(direction: str) -> bool:
    """Whether this process's first compression ("encode") or decoding ("decode") will
    compile gradzip's kernels: its rANS coder's kernel has no cache index yet."""
    from .entropy import rans

    return not compiled_before(rans._encode_kernel if direction == "encode" else rans.decode_stream_kernel)
