"""Lossless backend: zstd, with decompression capped at the size the record declares."""
from __future__ import annotations

import zstandard

from .errors import CorruptStreamError

DEFAULT_LEVEL = 3


def compress(data: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)


def decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress a zstd frame that must expand to exactly expected_size bytes."""
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise CorruptStreamError(f"bad zstd frame ({exc})") from None
    if params.content_size != expected_size:
        raise CorruptStreamError(f"zstd frame holds {params.content_size} bytes, record says {expected_size}")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected_size)
    except zstandard.ZstdError as exc:
        raise CorruptStreamError(f"bad zstd frame ({exc})") from None
    if len(out) != expected_size:
        raise CorruptStreamError("zstd frame has the wrong size")
    return out
