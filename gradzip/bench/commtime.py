"""Communication-time model: is compressing worth it at a given bandwidth?

Per round, a client either sends its raw update, taking raw_bytes / bandwidth, or compresses
it, sends the result and the server decompresses it:

    t_method = compress_s + compressed_bytes / bandwidth + decompress_s
    reduction = 1 - t_method / t_raw

Times are the measured single-thread compress and decompress times (after warm-up); the link
is modelled as a fixed bandwidth with no latency or protocol overhead, the same for every
method. Bandwidths are in bits per second (decimal units: 1 Mbit/s = 10**6 bit/s).
"""
from __future__ import annotations

import re

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(bit/s|bps|b/s)\s*$", re.IGNORECASE)

DEFAULT_BANDWIDTHS = "1Mbit/s,10Mbit/s,100Mbit/s"


def parse_bandwidth(text: str) -> float:
    """'10Mbit/s', '10 Mbps', '1.5Gbit/s' (bits) or '10MB/s' (bytes) -> bits per second."""
    match = _PATTERN.match(text)
    if not match:
        raise ValueError(f"bad bandwidth {text!r}; write it like 10Mbit/s, 100Mbps or 5MB/s")
    number, prefix, unit = match.groups()
    value = float(number) * _UNITS[prefix.lower()]
    # 'B/s' and 'Bps' (capital B) are bytes; 'bit/s', 'bps' and 'b/s' are bits.
    if unit in ("B/s", "Bps"):
        value *= 8
    if not value > 0:
        raise ValueError(f"bandwidth must be positive, not {text!r}")
    return value


def parse_bandwidths(text: str) -> list[float]:
    return [parse_bandwidth(part) for part in text.split(",") if part.strip()]


def format_bandwidth(bits_per_second: float) -> str:
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g} {prefix}bit/s"
    return f"{bits_per_second:g} bit/s"


def comm_time(*, compress_seconds: float, decompress_seconds: float, compressed_bytes: int, original_bytes: int,
              rounds: int, bandwidth: float) -> dict:
    """Mean time per round to move one client's update, compressed vs raw (totals over the sequence / rounds)."""
    rounds = max(rounds, 1)
    transfer = 8 * compressed_bytes / bandwidth / rounds
    total = (compress_seconds + decompress_seconds) / rounds + transfer
    raw = 8 * original_bytes / bandwidth / rounds
    return {"bandwidth_bit_per_s": bandwidth, "raw_seconds": raw, "compress_seconds": compress_seconds / rounds,
            "transfer_seconds": transfer, "decompress_seconds": decompress_seconds / rounds, "total_seconds": total,
            "reduction": 1 - total / raw if raw else 0.0}
