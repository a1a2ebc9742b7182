"""The .grz container: a sequential stream of checksummed frames (see docs/format.md).

    stream  := MAGIC u16:version frame(header) u32:crc32
               { frame(record) payload u32:crc32(frame bytes + payload) }* frame(end) u32:crc32
    frame   := varint:length bytes

Frames are JSON for readability. The bytes of all of a stream's frames, in order, form one
zstd frame over a fixed raw-content dictionary of the keys and values they repeat, flushed at
every frame's end: each frame decodes to its JSON given the frames before it, and a record
costs what is new in it (a name, some numbers), not its keys again.

Every length is checked against hard limits before it is trusted, frames are decompressed in
small steps against an output limit, and payloads are read in chunks, so a damaged length
fails at end of input instead of allocating what it claims.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from typing import BinaryIO, Iterator

import zstandard

from .errors import CorruptStreamError, InputError

MAGIC = b"\x89GRZ\r\n\x1a\n"  # PNG-style: catches text-mode mangling and truncation at byte 1
FORMAT_VERSION = 12  # 2: the bundle quantizes small float tensors; rank-1 scale contexts. 3: fitted scale contexts, shift along previous signs, XXH64 reconstruction checksums. 4: the linear predictor replaces that shift; frames share one zstd stream. 5: low-rank part of the linear prediction. 6: two rANS states for 4096-16383 codes. 7: state digests chained over the rounds, one-pass magnitude statistics. 8: an F16/BF16 tensor's escaped values as deltas from the decoder's narrowed values. 9: two rANS states from 2048 codes. 10: scale contexts add a conv kernel position's level (its taps' levels behind the columns'). 11: the elements of an all-zero row, column or tap get a scale context of their own (bucket 64). 12: a record's recon_check also binds its place, name, dtype and shape (a bundle's members) to its stream
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a frame's JSON, compressed or not; real ones are a few hundred bytes
# Compressed bytes per decompression step: a zstd block can inflate 4 bytes to 128 KiB, so a
# step adds at most 8 MiB before the size check (a frame is a few hundred bytes: one step).
_INFLATE_STEP = 256
# Part of the format: changing a byte of it needs a new FORMAT_VERSION.
FRAME_DICTIONARY = (
    b'{"kind":"header","round":0,"state_digest":"","input_digest":"","codec":{"error_bound":0.001,'
    b'"mode":"rel","beta":0.6,"tau":0.75,"magnitude_prediction":true,"sign_prediction":true,'
    b'"coder":"rans","min_lossy_elements":1024,"exact_small":false},"source_format":"safetensors","metadata":{},"tensor_count":1,'
    b'"created_by":"gradzip 0.1.0"}{"kind":"end","tensors":1,"state_digest":""}'
    b'{"kind":"tensor","name":"weight","dtype":"F32","shape":[1],"method":"lossless","params":{},'
    b'"sections":[["data",1]],"recon_check":1}'
    b'{"kind":"tensor","name":"conv.weight","dtype":"F32","shape":[1,1,3,3],"method":"quantized",'
    b'"params":{"eb":0.001,"predictor":"none","coder":"rans","escaped":0},"sections":[["codes",1]],'
    b'"recon_check":1}"predictor":"context","coder":"rans","mean":0.001,"std":0.001,'
    b'"sign_oriented":true,"contexts":"ema","context_merge":0,"escaped":0},"sections":[["codes",1]],'
    b'"sign_oriented":false,"contexts":"scale","fit":[16,0,-64],"context_merge":2,"escaped":0},"sections":[["codes",1],["row_scale",1],["col_scale",1]],'
    b'"sign_oriented":true,"contexts":"scale_ema","fit":[8,8,-32],"context_merge":1,'
    b'"predictor":"linear","coder":"rans","weights":[0.5,-0.1],"escaped":0},'
    b'"predictor":"linear","coder":"rans","mean":0.001,"std":0.001,"weights":[0.5,0.1],"sign_oriented":true,"contexts":"scale_ema","fit":[8,8,-32],"context_merge":0,'
    b'"predictor":"ema","coder":"huffman","huffman_bytes":1,"mean":0.001,"std":0.001,"signs":"kernel","oscillation":0,'
    b'"kernel_size":9,"kernel_bitmap_bytes":1,"escaped":1},"sections":[["codes",1],["kernel_bitmap",1],'
    b'["escape_index",1],["escape_value",1],["padding",1]],"recon_check":1}'
    b'"dtype":"BF16","dtype":"F16","dtype":"F64","dtype":"I64","npz","npy",".bias",".weight"'
    b'{"kind":"tensor","method":"bundle","members":[[0,"bn.bias","F32",[16],0.001],[1,"bn.num_batches_tracked","I64",[],0.0]],'
    b'"params":{"zstd":false,"raw_bytes":8,"coded":16},"sections":[["data",8],["codes",1]],"recon_check":1}'
    b'.running_mean",".running_var","norm.weight","norm.bias"'
    b'"weights":"rows","escaped":0,"rank":16,"rank_step":1e-05},"sections":[["codes",1],["row_weights",1],["low_rank",1],'
)
_FRAME_DICT = zstandard.ZstdCompressionDict(FRAME_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
# Level 6 (lazy2): each frame is flushed as its own zstd block, and level 12's optimal parser
# pays about 17 us a block to set up its prices: 6% of a small CNN's compression and 4.5% of
# a transformer's, for 0.18% and 0.09% smaller streams (sample_data, transformer-iid-short).
_FRAME_LEVEL = 6
_FRAME_DICT.precompute_compress(level=_FRAME_LEVEL)  # else each stream would rebuild it (1 ms)


def _frame_compressor() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=_FRAME_LEVEL, dict_data=_FRAME_DICT, write_content_size=False,
                                    write_checksum=False, write_dict_id=False)


class _IdlePerThread:
    """(De)compression contexts a finished stream hands back for the next one on its thread.

    A stream's frames are one zstd stream, so two streams open at once must never share a
    context; a stream abandoned midway (damaged input) does not hand its back. A fresh
    compression context touches 0.6 MiB every stream (a third of a small model's compress
    memory), a fresh decompressor loads the dictionary (19 us, 2% of a small model's
    decompression); a reused one neither, and the bytes are the same (a new chunker or
    decompressobj starts its context afresh)."""

    def __init__(self, make):
        self._make = make
        self._local = threading.local()

    def acquire(self):
        idle = self._local.__dict__.setdefault("idle", [])
        return idle.pop() if idle else self._make()

    def release(self, context) -> None:
        self._local.__dict__.setdefault("idle", []).append(context)


def _frame_decompressor() -> zstandard.ZstdDecompressor:
    return zstandard.ZstdDecompressor(dict_data=_FRAME_DICT)


_frame_compressors = _IdlePerThread(_frame_compressor)
_frame_decompressors = _IdlePerThread(_frame_decompressor)


# Output buffer of a stream's frame (de)compression: zstd's recommended 128 KiB was allocated
# per stream (per decompress step, too), a quarter of a small model's peak memory for frames
# of a few hundred bytes; a larger frame just takes several chunks. The bytes are the same.
_FRAME_CHUNK = 4096


MAX_PAYLOAD_BYTES = 1 << 40


def compact_json_encoder():
    """Compact JSON without NaN: JSONEncoder's C encoder built once (its encode builds one
    on every call, 5 of a small record's 9 us), with the same options, so the same text. It
    keeps no circular-reference markers, which a failed call could leave behind to fail a
    later one: frames are gradzip's own dicts. Without json's C accelerator, encode itself."""
    encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
    make = json.encoder.c_make_encoder
    if make is None:
        return encode
    chunks = make(None, json.JSONEncoder().default, json.encoder.encode_basestring_ascii, None, ":", ",",
                  False, False, False)
    return lambda obj: "".join(chunks(obj, 0))


# One encoder and decoder for every frame: json.dumps builds an encoder per call when given
# options, and json.loads of bytes first guesses their encoding (frames are ASCII).
_frame_json = compact_json_encoder()
# (json's scanner itself: decode's two whitespace matches cost more than a small frame's
# parse; a frame is one JSON value and nothing else, so the scan must end at the frame's end)
_frame_scan = json.JSONDecoder().scan_once
_READ_CHUNK = 1 << 24


def _crc(data: bytes, start: int = 0) -> int:
    return zlib.crc32(data, start) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def payload_size(record: dict) -> int:
    """The payload length a record declares: the sum of its section lengths."""
    sections = record.get("sections")
    if not isinstance(sections, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[1], int) and not isinstance(s[1], bool) and s[1] >= 0
            for s in sections):
        raise CorruptStreamError("bad section table")
    size = sum(s[1] for s in sections)
    if size > MAX_PAYLOAD_BYTES:
        raise CorruptStreamError("bad payload length")
    return size


class StreamWriter:
    """Writes one stream: header, records, end, in that order (the frames are one zstd
    stream, so a writer is used from one thread at a time, like the file it writes)."""

    def __init__(self, out: BinaryIO):
        self._out = out
        self._compressor = _frame_compressors.acquire()
        self._zstd = self._compressor.chunker(chunk_size=_FRAME_CHUNK)

    def _frame(self, obj: dict, last: bool = False) -> bytes:
        data = _frame_json(obj).encode()
        if len(data) > MAX_FRAME_BYTES:  # a reader refuses it: say so before the state advances
            what = "the header (its metadata)" if obj.get("kind") == "header" else "a tensor record (its names and shapes)"
            raise InputError(f"{what} would take {len(data)} bytes of JSON, over the stream format's limit of "
                             f"{MAX_FRAME_BYTES} a frame")
        # flush ends the zstd block (the frame decodes given the ones before); finish, the zstd frame
        compressed = b"".join([*self._zstd.compress(data), *(self._zstd.finish() if last else self._zstd.flush())])
        return _varint(len(compressed)) + compressed

    def header(self, header: dict) -> None:
        frame = self._frame({"kind": "header", **header})
        self._out.write(MAGIC + struct.pack("<H", FORMAT_VERSION) + frame + struct.pack("<I", _crc(frame)))

    def record(self, record: dict, payload: bytes) -> None:
        # The payload's length is not written: a reader takes the sum of the sections, so
        # a record whose sections do not add up to its payload (tests write such) fails there.
        frame = self._frame({"kind": "tensor", **record})
        self._out.write(frame)
        self._out.write(payload)
        self._out.write(struct.pack("<I", _crc(payload, _crc(frame))))

    def end(self, trailer: dict) -> None:
        frame = self._frame({"kind": "end", **trailer}, last=True)
        # (a writer abandoned before its end keeps its context: it is then simply not reused)
        _frame_compressors.release(self._compressor)
        self._out.write(frame + struct.pack("<I", _crc(frame)))


class StreamReader:
    """Reads a .grz stream front to back; every problem raises CorruptStreamError."""

    def __init__(self, source: BinaryIO, available: int | None = None):
        self._in = source
        self._available = available  # bytes left, when known (guards against huge claims)
        self.bytes_read = 0
        self._decompressor = _frame_decompressors.acquire()
        self._zstd = self._decompressor.decompressobj(write_size=_FRAME_CHUNK)

    def _read(self, n: int, what: str) -> bytes:
        if self._available is not None:
            if n > self._available:
                raise CorruptStreamError(f"truncated stream: {what} needs {n} bytes, {self._available} left")
            self._available -= n
        chunk = self._in.read(min(n, _READ_CHUNK)) or b""  # (a non-blocking source may return None)
        if len(chunk) == n:  # the usual case: one read (a pipe may return less)
            self.bytes_read += n
            return chunk
        chunks, remaining = [chunk], n - len(chunk)
        if not chunk:
            raise CorruptStreamError(f"truncated stream while reading {what}")
        while remaining:
            chunk = self._in.read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise CorruptStreamError(f"truncated stream while reading {what}")
            chunks.append(chunk)
            remaining -= len(chunk)
        self.bytes_read += n
        return b"".join(chunks)

    def _varint(self, what: str) -> tuple[int, bytes]:
        """(value, its bytes as stored)."""
        value, stored = 0, b""
        for shift in range(0, 35, 7):
            byte = self._read(1, what)
            stored += byte
            value |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                if byte[0] == 0 and len(stored) > 1:  # (a writer never pads a length)
                    raise CorruptStreamError(f"non-canonical {what}")
                return value, stored
        raise CorruptStreamError(f"bad {what}")

    def _frame(self, expected_kind: tuple[str, ...]) -> tuple[dict, bytes]:
        """(the frame's JSON object, its bytes as stored, for the checksum)."""
        length, stored_length = self._varint("frame length")
        if length > MAX_FRAME_BYTES:
            raise CorruptStreamError(f"frame length {length} exceeds the limit")
        data = self._read(length, "frame")
        try:
            if length <= _INFLATE_STEP:
                text = self._zstd.decompress(data)
            else:
                pieces, size = [], 0
                for at in range(0, length, _INFLATE_STEP):
                    piece = self._zstd.decompress(data[at : at + _INFLATE_STEP])
                    size += len(piece)
                    if size > MAX_FRAME_BYTES:
                        raise CorruptStreamError("frame inflates beyond the limit")
                    pieces.append(piece)
                text = b"".join(pieces)
            if len(text) > MAX_FRAME_BYTES:
                raise CorruptStreamError("frame inflates beyond the limit")
            text = text.decode()
            obj, end = _frame_scan(text, 0)
            if end != len(text):
                raise ValueError("data after the frame's JSON value")
        except zstandard.ZstdError:
            raise CorruptStreamError("frame is not valid zstd data") from None
        except (ValueError, UnicodeDecodeError, RecursionError, StopIteration):
            raise CorruptStreamError("frame is not valid JSON") from None
        if not isinstance(obj, dict) or obj.get("kind") not in expected_kind:
            raise CorruptStreamError(f"expected a {' or '.join(expected_kind)} frame")
        return obj, stored_length + data

    def _check(self, crc: int, what: str) -> None:
        (stored,) = struct.unpack("<I", self._read(4, f"{what} checksum"))
        if stored != crc:
            raise CorruptStreamError(f"{what} checksum mismatch")

    def header(self) -> dict:
        try:
            magic = self._read(len(MAGIC), "magic")
        except CorruptStreamError:
            magic = b""
        if magic != MAGIC:
            raise CorruptStreamError("not a gradzip stream (bad magic number)")
        (version,) = struct.unpack("<H", self._read(2, "format version"))
        if version != FORMAT_VERSION:
            raise CorruptStreamError(f"format version {version} is not supported (this gradzip reads {FORMAT_VERSION})")
        header, frame = self._frame(("header",))
        self._check(_crc(frame), "header frame")
        return header

    def records(self) -> Iterator[tuple[dict, bytes]]:
        """Yield (record, payload) per tensor; the end frame is left in self.trailer."""
        while True:
            record, frame = self._frame(("tensor", "end"))
            if record["kind"] == "end":
                self._check(_crc(frame), "end frame")
                self.trailer = record
                _frame_decompressors.release(self._decompressor)
                return
            name = record.get("name", "?")
            payload = self._read(payload_size(record), f"payload of {name!r}")
            self._check(_crc(payload, _crc(frame)), f"tensor {name!r}")
            yield record, payload

    def expect_end_of_input(self) -> None:
        if self._in.read(1):
            raise CorruptStreamError("unexpected bytes after the end of the stream")


_ONE_BYTE = [bytes((value,)) for value in range(0x80)]


class BufferReader(StreamReader):
    """A StreamReader over a whole stream already in memory (any bytes-like object): its
    frames and payloads are views of it, not copies, and a read is a slice (a small model's
    round reads about 35 times: 0.7 us a read through a file object). The same checks and
    messages as reading the stream from a file."""

    def __init__(self, data):
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1 or not view.c_contiguous:
            view = memoryview(view.tobytes())
        super().__init__(None, len(view))
        self._view = view.cast("B")
        self._at = 0

    def _read(self, n: int, what: str) -> memoryview:
        at, size = self._at, len(self._view)
        if n > size - at:
            raise CorruptStreamError(f"truncated stream: {what} needs {n} bytes, {size - at} left")
        self._at = self.bytes_read = at + n
        return self._view[at : at + n]

    def _varint(self, what: str) -> tuple[int, bytes]:
        at = self._at
        if at < len(self._view) and self._view[at] < 0x80:  # a one-byte length: every frame of a small model
            self._at = self.bytes_read = at + 1
            return self._view[at], _ONE_BYTE[self._view[at]]
        return super()._varint(what)

    def expect_end_of_input(self) -> None:
        if self._at != len(self._view):
            raise CorruptStreamError("unexpected bytes after the end of the stream")


def split_stream(blob: bytes) -> tuple[dict, list[tuple[dict, bytes]], dict]:
    """A whole stream as (header, [(record, payload), ...], end frame), every check applied."""
    reader = StreamReader(io.BytesIO(blob), len(blob))
    header = reader.header()
    records = list(reader.records())
    reader.expect_end_of_input()
    return header, records, reader.trailer


def join_stream(header: dict, records, trailer: dict) -> bytes:
    """The inverse of split_stream (lengths and checksums recomputed)."""
    out = io.BytesIO()
    writer = StreamWriter(out)
    writer.header(header)
    for record, payload in records:
        writer.record(record, payload)
    writer.end(trailer)
    return out.getvalue()
