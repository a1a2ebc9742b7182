"""Lossless backend: zstd, with decompression capped at the size the record declares."""
from __future__ import annotations

import threading

import zstandard

from .errors import CorruptStreamError

DEFAULT_LEVEL = 3
_per_thread = threading.local()  # zstd contexts are reusable but not shareable between threads


def compress(data, level: int = DEFAULT_LEVEL) -> bytes:
    """zstd frame of any bytes-like object."""
    compressors = _per_thread.__dict__.setdefault("compressors", {})
    if level not in compressors:
        compressors[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return compressors[level].compress(data)


def decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress a zstd frame that must expand to exactly expected_size bytes."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise CorruptStreamError(f"bad zstd frame ({exc})") from None
    if params.content_size != expected_size:
        raise CorruptStreamError(f"zstd frame holds {params.content_size} bytes, record says {expected_size}")
    if not hasattr(_per_thread, "decompressor"):
        _per_thread.decompressor = zstandard.ZstdDecompressor()
    try:
        # (bytes after the frame are refused: they would ride along unchecked by any decoder)
        out = _per_thread.decompressor.decompress(data, max_output_size=expected_size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptStreamError(f"bad zstd frame ({exc})") from None
    if len(out) != expected_size:
        raise CorruptStreamError("zstd frame has the wrong size")
    return out
