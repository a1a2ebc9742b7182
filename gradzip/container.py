"""The .grz container: a sequential stream of checksummed frames (see docs/format.md).

    stream  := MAGIC u16:version frame(header) { frame(record) payload u32:crc32(payload) }* frame(end)
    frame   := u32:length zstd(JSON, FRAME_DICTIONARY) u32:crc32(compressed JSON)

Frames are JSON for readability, compressed with a fixed raw-content zstd dictionary of the
keys and values they repeat, so a tensor record costs tens of bytes rather than hundreds.

Every length is checked against hard limits before it is trusted, and payloads are read in
chunks, so a damaged length fails at end of input instead of allocating what it claims.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from typing import BinaryIO, Iterator

import zstandard

from .errors import CorruptStreamError

MAGIC = b"\x89GRZ\r\n\x1a\n"  # PNG-style: catches text-mode mangling and truncation at byte 1
FORMAT_VERSION = 4  # 2: the bundle quantizes small float tensors; rank-1 scale contexts. 3: fitted scale contexts, shift along previous signs, XXH64 reconstruction checksums. 4: the linear predictor replaces that shift
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a frame's JSON, compressed or not; real ones are a few hundred bytes
# Part of the format: changing a byte of it needs a new FORMAT_VERSION.
FRAME_DICTIONARY = (
    b'{"kind":"header","round":0,"state_digest":"","input_digest":"","codec":{"error_bound":0.001,'
    b'"mode":"rel","beta":0.6,"tau":0.75,"magnitude_prediction":true,"sign_prediction":true,'
    b'"coder":"rans","min_lossy_elements":1024,"exact_small":false},"source_format":"safetensors","metadata":{},"tensor_count":1,'
    b'"created_by":"gradzip 0.1.0"}{"kind":"end","tensors":1,"state_digest":""}'
    b'{"kind":"tensor","name":"weight","dtype":"F32","shape":[1],"method":"lossless","params":{},'
    b'"sections":[["data",1]],"recon_check":1,"payload_bytes":1}'
    b'{"kind":"tensor","name":"conv.weight","dtype":"F32","shape":[1,1,3,3],"method":"quantized",'
    b'"params":{"eb":0.001,"predictor":"none","coder":"rans","escaped":0},"sections":[["codes",1]],'
    b'"recon_check":1,"payload_bytes":1}"predictor":"context","coder":"rans","mean":0.001,"std":0.001,'
    b'"sign_oriented":true,"contexts":"ema","context_merge":0,"escaped":0},"sections":[["codes",1]],'
    b'"sign_oriented":false,"contexts":"scale","fit":[16,0,-64],"context_merge":2,"escaped":0},"sections":[["codes",1],["row_scale",1],["col_scale",1]],'
    b'"sign_oriented":true,"contexts":"scale_ema","fit":[8,8,-32],"context_merge":1,'
    b'"predictor":"linear","coder":"rans","weights":[0.5,-0.1],"escaped":0},'
    b'"predictor":"linear","coder":"rans","mean":0.001,"std":0.001,"weights":[0.5,0.1],"sign_oriented":true,"contexts":"scale_ema","fit":[8,8,-32],"context_merge":0,'
    b'"predictor":"ema","coder":"huffman","huffman_bytes":1,"mean":0.001,"std":0.001,"signs":"kernel","oscillation":0,'
    b'"kernel_size":9,"kernel_bitmap_bytes":1,"escaped":1},"sections":[["codes",1],["kernel_bitmap",1],'
    b'["escape_index",1],["escape_value",1],["padding",1]],"recon_check":1,"payload_bytes":1}'
    b'"dtype":"BF16","dtype":"F16","dtype":"F64","dtype":"I64","npz","npy",".bias",".weight"'
    b'{"kind":"tensor","method":"bundle","members":[[0,"bn.bias","F32",[16],0.001],[1,"bn.num_batches_tracked","I64",[],0.0]],'
    b'"params":{"zstd":false,"raw_bytes":8,"coded":16},"sections":[["data",8],["codes",1]],"recon_check":1,"payload_bytes":1}'
    b'.running_mean",".running_var","norm.weight","norm.bias"'
)
_FRAME_DICT = zstandard.ZstdCompressionDict(FRAME_DICTIONARY, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
_FRAME_LEVEL = 9
_per_thread = threading.local()


def _frame_compressor() -> zstandard.ZstdCompressor:
    """One per thread: loading the dictionary costs milliseconds, and zstd contexts are not
    safe to share between threads."""
    if not hasattr(_per_thread, "compressor"):
        _per_thread.compressor = zstandard.ZstdCompressor(
            level=_FRAME_LEVEL, dict_data=_FRAME_DICT, write_content_size=True, write_checksum=False, write_dict_id=False)
    return _per_thread.compressor


def _frame_decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_per_thread, "decompressor"):
        _per_thread.decompressor = zstandard.ZstdDecompressor(dict_data=_FRAME_DICT)
    return _per_thread.decompressor
MAX_PAYLOAD_BYTES = 1 << 40
_READ_CHUNK = 1 << 24


def _crc(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


class StreamWriter:
    def __init__(self, out: BinaryIO):
        self._out = out

    def _frame(self, obj: dict) -> None:
        data = _frame_compressor().compress(json.dumps(obj, separators=(",", ":"), allow_nan=False).encode())
        self._out.write(struct.pack("<I", len(data)) + data + struct.pack("<I", _crc(data)))

    def header(self, header: dict) -> None:
        self._out.write(MAGIC + struct.pack("<H", FORMAT_VERSION))
        self._frame({"kind": "header", **header})

    def record(self, record: dict, payload: bytes) -> None:
        self._frame({"kind": "tensor", **record, "payload_bytes": len(payload)})
        self._out.write(payload)
        self._out.write(struct.pack("<I", _crc(payload)))

    def end(self, trailer: dict) -> None:
        self._frame({"kind": "end", **trailer})


class StreamReader:
    """Reads a .grz stream front to back; every problem raises CorruptStreamError."""

    def __init__(self, source: BinaryIO, available: int | None = None):
        self._in = source
        self._available = available  # bytes left, when known (guards against huge claims)
        self.bytes_read = 0

    def _read(self, n: int, what: str) -> bytes:
        if self._available is not None:
            if n > self._available:
                raise CorruptStreamError(f"truncated stream: {what} needs {n} bytes, {self._available} left")
            self._available -= n
        chunks = []
        remaining = n
        while remaining:
            chunk = self._in.read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise CorruptStreamError(f"truncated stream while reading {what}")
            chunks.append(chunk)
            remaining -= len(chunk)
        self.bytes_read += n
        return b"".join(chunks)

    def _frame(self, expected_kind: tuple[str, ...]) -> dict:
        (length,) = struct.unpack("<I", self._read(4, "frame length"))
        if length > MAX_FRAME_BYTES:
            raise CorruptStreamError(f"frame length {length} exceeds the limit")
        data = self._read(length, "frame")
        (crc,) = struct.unpack("<I", self._read(4, "frame checksum"))
        if _crc(data) != crc:
            raise CorruptStreamError("frame checksum mismatch")
        try:
            obj = json.loads(_frame_decompressor().decompress(data, max_output_size=MAX_FRAME_BYTES))
        except zstandard.ZstdError:
            raise CorruptStreamError("frame is not a valid zstd frame") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CorruptStreamError("frame is not valid JSON") from None
        if not isinstance(obj, dict) or obj.get("kind") not in expected_kind:
            raise CorruptStreamError(f"expected a {' or '.join(expected_kind)} frame")
        return obj

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
        return self._frame(("header",))

    def records(self) -> Iterator[tuple[dict, bytes]]:
        """Yield (record, payload) per tensor; the end frame is left in self.trailer."""
        while True:
            frame = self._frame(("tensor", "end"))
            if frame["kind"] == "end":
                self.trailer = frame
                return
            size = frame.get("payload_bytes")
            if not isinstance(size, int) or not 0 <= size <= MAX_PAYLOAD_BYTES:
                raise CorruptStreamError("bad payload length")
            payload = self._read(size, f"payload of {frame.get('name', '?')!r}")
            (crc,) = struct.unpack("<I", self._read(4, "payload checksum"))
            if _crc(payload) != crc:
                raise CorruptStreamError(f"payload checksum mismatch in tensor {frame.get('name', '?')!r}")
            yield frame, payload

    def expect_end_of_input(self) -> None:
        if self._in.read(1):
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
