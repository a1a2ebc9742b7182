"""XXH64, the checksum of reconstructions and states: model-sized data hashed every round,
so it runs at memory speed (a numba kernel, about 3x zlib's CRC-32 here) instead of CRC-32
plus Adler-32. It catches damage and mismatches, not attackers (docs/guarantees.md)."""
from __future__ import annotations

import numba
import numpy as np

_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)
# fingerprint joins parts under _SMALL_PART bytes into chunks of about _JOINED_CHUNK: an
# update costs more than copying a small part (a transformer's 44 state arrays: digest
# 0.61 -> 0.42 ms); chunks of 1 MiB saved no more and added 0.7 MiB to a round's memory,
# and parts up to 64 KiB in chunks of 128 KiB added 45 KiB to a small CNN's.
_SMALL_PART = 1 << 12
_JOINED_CHUNK = 1 << 14


@numba.njit(cache=True, nogil=True, inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@numba.njit(cache=True, nogil=True, inline="always")
def _round(acc, lane):
    return _rotl(acc + lane * _P2, 31) * _P1


@numba.njit(cache=True, nogil=True, inline="always")
def _merge(acc, lane):
    return (acc ^ _round(np.uint64(0), lane)) * _P1 + _P4


@numba.njit(cache=True, nogil=True, inline="always")
def _word(raw, i):
    # Little-endian from bytes: portable and alignment-free; LLVM fuses it into one load.
    return (np.uint64(raw[i]) | (np.uint64(raw[i + 1]) << np.uint64(8)) | (np.uint64(raw[i + 2]) << np.uint64(16))
            | (np.uint64(raw[i + 3]) << np.uint64(24)) | (np.uint64(raw[i + 4]) << np.uint64(32))
            | (np.uint64(raw[i + 5]) << np.uint64(40)) | (np.uint64(raw[i + 6]) << np.uint64(48))
            | (np.uint64(raw[i + 7]) << np.uint64(56)))


@numba.njit(cache=True, nogil=True)
def _stripes(lanes, raw):
    """Fold the whole 32-byte stripes of raw (uint8) into the four accumulators, in place."""
    v1, v2, v3, v4 = lanes[0], lanes[1], lanes[2], lanes[3]
    end = raw.size - raw.size % 32
    i = 0
    while i < end:
        v1 = _round(v1, _word(raw, i))
        v2 = _round(v2, _word(raw, i + 8))
        v3 = _round(v3, _word(raw, i + 16))
        v4 = _round(v4, _word(raw, i + 24))
        i += 32
    lanes[0], lanes[1], lanes[2], lanes[3] = v1, v2, v3, v4


@numba.njit(cache=True, nogil=True)
def _finish(lanes, seed, length, rest):
    """The digest, given the accumulators after every whole stripe, the total length, and the
    bytes after the last stripe (under 32)."""
    if length >= 32:
        v1, v2, v3, v4 = lanes[0], lanes[1], lanes[2], lanes[3]
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(h, v1)
        h = _merge(h, v2)
        h = _merge(h, v3)
        h = _merge(h, v4)
    else:
        h = seed + _P5
    h += np.uint64(length)
    t = 0
    while t + 8 <= rest.size:
        h = _rotl(h ^ _round(np.uint64(0), _word(rest, t)), 27) * _P1 + _P4
        t += 8
    if t + 4 <= rest.size:
        word = (np.uint64(rest[t]) | (np.uint64(rest[t + 1]) << np.uint64(8)) | (np.uint64(rest[t + 2]) << np.uint64(16))
                | (np.uint64(rest[t + 3]) << np.uint64(24)))
        h = _rotl(h ^ (word * _P1), 23) * _P2 + _P3
        t += 4
    while t < rest.size:
        h = _rotl(h ^ (np.uint64(rest[t]) * _P5), 11) * _P1
        t += 1
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


def _bytes_of(data) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(data, np.uint8)


def _initial_lanes(seed: int) -> np.ndarray:
    p1, p2, mask = int(_P1), int(_P2), (1 << 64) - 1
    return np.array([(seed + p1 + p2) & mask, (seed + p2) & mask, seed & mask, (seed - p1) & mask], np.uint64)


class Xxh64:
    """Streaming XXH64: update() with consecutive pieces, then digest() is the XXH64 of their
    concatenation."""

    def __init__(self, seed: int = 0):
        self.seed = np.uint64(seed)
        self.lanes = _initial_lanes(seed)
        self.pending = np.empty(32, np.uint8)  # the first n_pending bytes: not yet folded in
        self.n_pending = 0
        self.length = 0

    def update(self, data) -> "Xxh64":
        raw = _bytes_of(data)
        self.length += raw.size
        self.n_pending = int(_absorb(self.lanes, self.pending, self.n_pending, raw))
        return self

    def digest(self) -> int:
        return int(_finish(self.lanes, self.seed, self.length, self.pending[:self.n_pending]))


@numba.njit(cache=True, nogil=True)
def _absorb(lanes, pending, n_pending, raw):
    """Fold raw (uint8) in behind the n_pending bytes held in pending (32 bytes); returns how
    many bytes pending holds after (one kernel call an update: its Python steps, joining the
    pending bytes to the next piece, cost more than hashing a small tensor)."""
    # Element loops, not slice copies: numba's array-to-slice assignment compiles a
    # shape-mismatch message (str, repr and concatenation), 4-5 s of a cold start.
    start = 0
    if n_pending > 0:
        start = min(32 - n_pending, raw.size)
        for i in range(start):
            pending[n_pending + i] = raw[i]
        n_pending += start
        if n_pending < 32:
            return n_pending
        _stripes(lanes, pending)
    body = raw[start:]
    _stripes(lanes, body)
    tail = body.size % 32
    for i in range(tail):
        pending[i] = body[body.size - tail + i]
    return tail


@numba.njit(cache=True, nogil=True)
def _xxh64_whole(raw, seed, lanes):
    """XXH64 of raw (uint8) in one call: a tensor's reconstruction is hashed every round,
    where the streaming class's Python steps cost more than the hashing."""
    _stripes(lanes, raw)
    return _finish(lanes, seed, raw.size, raw[raw.size - raw.size % 32:])


def xxh64(data, seed: int = 0) -> int:
    """XXH64 of a bytes-like object or a numpy array's bytes."""
    lanes = _SEED_0_LANES.copy() if seed == 0 else _initial_lanes(seed)  # (building them costs more than a small hash)
    return int(_xxh64_whole(_bytes_of(data), np.uint64(seed), lanes))


_SEED_0_LANES = _initial_lanes(0)


@numba.njit(cache=True, nogil=True)
def xxh64_kernel(raw):
    """xxh64(raw) (seed 0; raw: uint8) inside a kernel that hashes what it computed."""
    return _xxh64_whole(raw, np.uint64(0), _SEED_0_LANES.copy())


def fingerprint(parts) -> bytes:
    """8 bytes naming a sequence of byte strings: the XXH64 of their concatenation, little-endian."""
    stream, small, small_bytes = Xxh64(), [], 0
    for part in parts:
        raw = _bytes_of(part)
        if raw.size < _SMALL_PART:
            small.append(raw)
            small_bytes += raw.size
            if small_bytes < _JOINED_CHUNK:
                continue
            raw = None
        if small:
            stream.update(b"".join(small))
            small, small_bytes = [], 0
        if raw is not None:
            stream.update(raw)
    if small:
        stream.update(b"".join(small))
    return stream.digest().to_bytes(8, "little")
