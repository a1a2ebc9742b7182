"""Damaged .grz streams: every truncation and every single-byte flip is detected with
gradzip's own exception types, the decompressor's state is left as it was, and claims of huge
shapes or payloads are refused without allocating what they claim."""
from __future__ import annotations

import io
import json
import random
import struct
import tracemalloc
import zlib

import numpy as np
import pytest

from gradzip import Compressor, CorruptStreamError, Decompressor, GradzipError, StateMismatchError
from gradzip import container, lossless
from gradzip.api import describe_stream
from gradzip.container import FORMAT_VERSION, MAGIC, StreamReader, StreamWriter, _varint, join_stream, split_stream
from gradzip.state import PredictorState

# Refusing a bomb may cost a little working memory, never what the stream claims.
ALLOCATION_LIMIT = 16 * 1024 * 1024


def small_rounds():
    """Two rounds whose second stream is small (~2 KB) yet uses prediction, a kernel bitmap,
    escapes (float16 NaN/Inf) and lossless records."""
    rng = np.random.default_rng(41)
    conv = rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * np.sign(rng.normal(size=(16, 8, 1, 1)))
    fc = rng.normal(size=1040)
    rounds = []
    for r in range(2):
        rounds.append({
            "conv.weight": (conv * (1 + 0.05 * r) + 0.02 * rng.normal(size=conv.shape)).astype(np.float32),
            "half": (fc * (1 + 0.05 * r) + 0.01 * rng.normal(size=fc.shape)).astype(np.float16),
            "bias": rng.normal(size=8).astype(np.float32),
            "steps": np.array(r + 1, np.int64),
        })
    rounds[1]["half"][:3] = [np.nan, np.inf, -np.inf]
    return rounds


@pytest.fixture(scope="module")
def streams():
    """(round-1 stream, state bytes before it, state bytes after it, end offset of the header frame)."""
    rounds = small_rounds()
    c = Compressor(1e-2, "rel")
    c.compress(rounds[0])
    before = c.state.to_bytes()
    blob = c.compress(rounds[1])
    after = c.state.to_bytes()
    reader = StreamReader(io.BytesIO(blob), len(blob))
    reader.header()
    header_end = reader.bytes_read
    out = Decompressor(PredictorState.from_bytes(before)).decompress(blob)
    assert list(out) == list(rounds[1])
    report = describe_stream(io.BytesIO(blob), len(blob))
    assert {t.predictor for t in report.tensors if t.method == "quantized"} - {"none"}, "round 1 should use prediction"
    assert any(t.escaped for t in report.tensors), "round 1 should escape the float16 NaN/Inf"
    return blob, before, after, header_end


_STATES: dict[bytes, PredictorState] = {}


def expect_rejected(blob: bytes, state_bytes: bytes, allowed=(CorruptStreamError,), available: bool = True, what=""):
    """Decode must raise one of `allowed` (never anything else, never succeed) and keep the state."""
    state = _STATES.setdefault(state_bytes, PredictorState.from_bytes(state_bytes))
    d = Decompressor(state)
    try:
        if available:
            d.decompress(blob)
        else:
            d.decompress_from(io.BytesIO(blob), available=None)
    except allowed as exc:
        assert d.state is state, "a rejected stream replaced the state"
        return exc
    except Exception as exc:  # noqa: BLE001 - the point is to name what escaped
        pytest.fail(f"{what}: {type(exc).__name__} escaped instead of {[a.__name__ for a in allowed]}: {exc}")
    pytest.fail(f"{what}: a damaged stream decoded without an error")


@pytest.fixture(autouse=True)
def state_objects_are_not_mutated():
    """Rejections reuse one state object per state; it must never be modified in place."""
    yield
    for state_bytes, state in _STATES.items():
        assert state.to_bytes() == state_bytes, "a rejected stream modified the state in place"


def test_stream_decodes_to_the_compressor_state(streams):
    blob, before, after, _ = streams
    d = Decompressor(PredictorState.from_bytes(before))
    d.decompress(blob)
    assert d.state.to_bytes() == after


def test_every_truncation_is_detected(streams):
    blob, before, _, _ = streams
    for length in range(len(blob)):
        exc = expect_rejected(blob[:length], before, what=f"first {length} bytes")
        assert str(exc)


def test_truncations_read_from_a_pipe_are_detected(streams):
    """Without a known length (stdin), a stream cut short still fails cleanly."""
    blob, before, _, header_end = streams
    for length in sorted(set(range(header_end + 64)) | set(range(0, len(blob), 5))):
        expect_rejected(blob[:length], before, available=False, what=f"first {length} bytes from a pipe")


def test_every_truncation_is_detected_by_stats(streams):
    blob, _, _, _ = streams
    for length in range(len(blob)):
        with pytest.raises(CorruptStreamError):
            describe_stream(io.BytesIO(blob[:length]), length)


def test_every_single_byte_flip_is_detected(streams):
    """Header, records, payloads, checksums and the end frame: any flipped byte is caught."""
    blob, before, _, header_end = streams
    masks = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF, 0x55, 0xAA]
    for i in range(len(blob)):
        damaged = bytearray(blob)
        damaged[i] ^= masks[i % len(masks)]
        allowed = (CorruptStreamError, StateMismatchError) if i < header_end else (CorruptStreamError,)
        expect_rejected(bytes(damaged), before, allowed, what=f"byte {i} ^ {masks[i % len(masks)]:#x}")


def test_trailing_bytes_and_concatenated_streams_are_rejected(streams):
    blob, before, _, _ = streams
    for extra in (b"\0", b"x" * 100, blob):
        expect_rejected(blob + extra, before)
        expect_rejected(blob + extra, before, available=False)


def test_random_garbage_is_rejected(streams):
    blob, before, _, _ = streams
    rng = random.Random(42)
    for _ in range(300):
        garbage = rng.randbytes(rng.choice([0, 1, 7, 9, 10, 14, 64, 1000, 5000]))
        if rng.random() < 0.5:
            garbage = MAGIC + struct.pack("<H", 1) + garbage
        expect_rejected(garbage, before)
    expect_rejected(blob[::-1], before)
    expect_rejected(b"PK\x03\x04" + blob, before)


def test_wrong_format_version_is_rejected(streams):
    blob, before, _, _ = streams
    damaged = blob[: len(MAGIC)] + struct.pack("<H", FORMAT_VERSION + 1) + blob[len(MAGIC) + 2:]
    exc = expect_rejected(damaged, before)
    assert "version" in str(exc)


# ----------------------------------------------------------------------------- hand-made streams


parse = split_stream
build = join_stream


def test_rebuilt_stream_is_identical(streams):
    """The hand-made streams below are built with the real writer: check it reproduces a stream."""
    blob, before, _, _ = streams
    assert build(*parse(blob)) == blob


def assert_rejected_without_allocating(blob: bytes, state_bytes: bytes, available: bool = True):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        exc = expect_rejected(blob, state_bytes, available=available)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < ALLOCATION_LIMIT, f"rejecting a {len(blob)}-byte stream allocated {peak} bytes"
    return exc


@pytest.mark.parametrize("shape", [[2**20, 2**20], [2**62], [2**31, 2**31, 2**31], [10**9]])
@pytest.mark.parametrize("method", ["lossless", "quantized"])
def test_huge_shape_claim_is_rejected_without_allocating(streams, shape, method):
    blob, before, _, _ = streams
    header, records, trailer = parse(blob)
    state = PredictorState.from_bytes(before)
    fresh_header = dict(header, round=state.round, state_digest=state.digest(), tensor_count=1)
    payload = lossless.compress(b"\0" * 64)
    params = {} if method == "lossless" else {"eb": 0.1, "predictor": "none", "coder": "rans", "escaped": 0}
    record = {"name": "bomb", "dtype": "F64", "shape": shape, "method": method, "params": params,
              "sections": [["data" if method == "lossless" else "codes", len(payload)]], "recon_check": 0}
    bomb = build(fresh_header, [(record, payload)], dict(trailer, tensors=1))
    assert_rejected_without_allocating(bomb, before)
    assert_rejected_without_allocating(bomb, before, available=False)


def test_zstd_frame_claiming_a_huge_size_is_rejected_without_allocating(streams):
    blob, before, _, _ = streams
    header, records, trailer = parse(blob)
    # zstd frame: magic, descriptor (single segment, 8-byte content size), content size, one empty raw block.
    for claimed in (2**40, 2**31, 8000):  # 8000 bytes is what the record needs (2000 float32)
        liar = b"\x28\xb5\x2f\xfd" + b"\xe0" + struct.pack("<Q", claimed) + b"\x01\x00\x00"
        record = {"name": "liar", "dtype": "F32", "shape": [2000], "method": "lossless", "params": {},
                  "sections": [["data", len(liar)]], "recon_check": 0}
        bomb = build(dict(header, tensor_count=len(records) + 1), [*records, (record, liar)],
                     dict(trailer, tensors=len(records) + 1))
        assert_rejected_without_allocating(bomb, before)
        bundle = {"method": "bundle", "members": [[len(records), "liar", "F32", [2000]]],
                  "params": {"zstd": True, "raw_bytes": 8000}, "sections": [["data", len(liar)]], "recon_check": 0}
        bomb = build(dict(header, tensor_count=len(records) + 1), [*records, (bundle, liar)],
                     dict(trailer, tensors=len(records) + 1))
        assert_rejected_without_allocating(bomb, before)


@pytest.mark.parametrize("shape", [[2**20, 2**20], [2**62], [10**9]])
def test_bundle_claiming_huge_members_is_rejected_without_allocating(streams, shape):
    blob, before, _, _ = streams
    header, records, trailer = parse(blob)
    payload = lossless.compress(b"\0" * 64)
    n = int(np.prod(shape, dtype=object))
    for raw_bytes in (8 * n, 64):
        bundle = {"method": "bundle", "members": [[0, "bomb", "F64", shape]], "params": {"zstd": True, "raw_bytes": raw_bytes},
                  "sections": [["data", len(payload)]], "recon_check": 0}
        bomb = build(dict(header, tensor_count=1), [(bundle, payload)], dict(trailer, tensors=1))
        assert_rejected_without_allocating(bomb, before)
        assert_rejected_without_allocating(bomb, before, available=False)


@pytest.mark.parametrize("available", [True, False], ids=["file", "pipe"])
def test_huge_payload_claim_is_rejected_without_allocating(streams, available):
    """A record frame says its payload is huge; the stream ends long before."""
    blob, before, _, header_end = streams
    header, records, trailer = parse(blob)
    record, payload = records[0]
    writer = StreamWriter(io.BytesIO())
    writer.header(header)  # the record frame continues the header's zstd stream
    frame = writer._frame({**record, "kind": "tensor", "sections": [["codes", 2**39]]})
    bomb = blob[:header_end] + frame + payload + struct.pack("<I", zlib.crc32(frame + payload))
    exc = assert_rejected_without_allocating(bomb, before, available=available)
    assert "trunc" in str(exc).lower() or "payload" in str(exc).lower()


@pytest.mark.parametrize("available", [True, False], ids=["file", "pipe"])
def test_huge_frame_length_is_rejected_without_allocating(streams, available):
    blob, before, _, header_end = streams
    for length in (2**32 - 1, 2**31, 10**9, 2**34):
        bomb = blob[:header_end] + _varint(length) + b"{" * 100
        assert_rejected_without_allocating(bomb, before, available=available)


def test_duplicate_tensor_in_a_stream_is_rejected(streams):
    blob, before, _, _ = streams
    header, records, trailer = parse(blob)
    for extra in records:  # each record (a tensor's own, or the small-tensor bundle) a second time
        doubled = build(dict(header, tensor_count=len(records) + 1), records + [extra], dict(trailer, tensors=len(records) + 1))
        expect_rejected(doubled, before, what=f"{extra[0].get('name', extra[0]['method'])} twice")
    bundle = next(r for r in records if r[0]["method"] == "bundle")
    members = bundle[0]["members"]
    twin = dict(bundle[0], members=members + [[len(records) + 5, members[0][1], *members[0][2:]]])
    expect_rejected(build(header, [(twin, bundle[1])] + [r for r in records if r is not bundle], trailer), before,
                    what="a bundle member named twice")


def test_record_and_header_field_damage_with_valid_checksums_is_rejected(streams):
    """Checksums recomputed after the damage: structure checks alone must catch it."""
    blob, before, _, _ = streams
    header, records, trailer = parse(blob)
    quantized = next(i for i, (r, _) in enumerate(records) if r["method"] == "quantized" and r["params"]["predictor"] != "none")
    record, payload = records[quantized]
    variants = []
    for key, value in [("shape", [len(payload)]), ("shape", [-1, 5]), ("shape", "big"), ("shape", [1.5]),
                       ("dtype", "F128"), ("dtype", "I32"), ("dtype", None), ("method", "magic"), ("name", 7),
                       ("sections", [["codes", len(payload) + 1]]), ("sections", []), ("sections", "x"),
                       ("recon_check", 0), ("params", {}), ("params", None),
                       ("name", ["conv.weight"]), ("name", {"a": 1}), ("name", None)]:
        variants.append((f"record {key}={value!r}", header, [*records[:quantized], (dict(record, **{key: value}), payload), *records[quantized + 1:]], trailer))
    for key, value in [("eb", -1.0), ("eb", 0.0), ("eb", 1e308), ("eb", "x"), ("predictor", "oracle"),
                       ("coder", "lzma"), ("escaped", -1), ("escaped", 10**9), ("escaped", 1.5),
                       ("mean", 1e300), ("std", -1.0), ("oscillation", 7), ("kernel_size", 3),
                       ("kernel_bitmap_bytes", 10**9), ("huffman_bytes", 10**12)]:
        if key not in record["params"]:
            continue  # a parameter the record's method does not use
        params = dict(record["params"], **{key: value})
        variants.append((f"params {key}={value!r}", header, [*records[:quantized], (dict(record, params=params), payload), *records[quantized + 1:]], trailer))
    for key, value in [("round", 0), ("round", -1), ("round", "1"), ("state_digest", "0" * 16), ("tensor_count", 1),
                       ("source_format", "hdf5"), ("codec", {}), ("codec", None),
                       ("codec", dict(header["codec"], error_bound=-1)), ("codec", dict(header["codec"], mode="pw")),
                       ("codec", dict(header["codec"], beta="0.3")), ("codec", dict(header["codec"], tau=None)),
                       ("codec", dict(header["codec"], error_bound="1e-2")), ("codec", dict(header["codec"], mode=["rel"])),
                       ("codec", dict(header["codec"], min_lossy_elements="1024"))]:
        variants.append((f"header {key}={value!r}", dict(header, **{key: value}), records, trailer))
    for key, value in [("tensors", 0), ("state_digest", "0" * 16)]:
        variants.append((f"trailer {key}={value!r}", header, records, dict(trailer, **{key: value})))
    b = next(i for i, (r, _) in enumerate(records) if r["method"] == "bundle")
    bundle, bundle_payload = records[b]
    first = bundle["members"][0]
    for what, changed in [
            ("member shape", [[first[0], first[1], first[2], [s + 1 for s in first[3]] or [2]], *bundle["members"][1:]]),
            ("member dtype", [[first[0], first[1], "F64" if first[2] != "F64" else "F32", first[3]], *bundle["members"][1:]]),
            ("member name", [[first[0], 5, first[2], first[3]], *bundle["members"][1:]]),
            ("member position", [[-1, first[1], first[2], first[3]], *bundle["members"][1:]]),
            ("member position far away", [[10**6, first[1], first[2], first[3]], *bundle["members"][1:]]),
            ("member dropped", bundle["members"][1:]), ("member short", [first[:3], *bundle["members"][1:]]),
            ("members not a list", "members"), ("members null", None)]:
        variants.append((f"bundle {what}", header, [*records[:b], (dict(bundle, members=changed), bundle_payload),
                                                     *records[b + 1:]], trailer))
    for key, value in [("zstd", not bundle["params"]["zstd"]), ("raw_bytes", bundle["params"]["raw_bytes"] + 1),
                       ("raw_bytes", -1), ("raw_bytes", None)]:
        variants.append((f"bundle params {key}={value!r}", header,
                         [*records[:b], (dict(bundle, params=dict(bundle["params"], **{key: value})), bundle_payload),
                          *records[b + 1:]], trailer))
    variants.append(("last record dropped", header, records[:-1], trailer))
    escaped = []
    for what, *variant in variants:
        try:
            expect_rejected(build(*variant), before, allowed=(CorruptStreamError, StateMismatchError), what=what)
        except pytest.fail.Exception as exc:
            escaped.append(str(exc))
    assert not escaped, "\n".join(escaped)


def test_api_raises_only_gradzip_errors_on_non_bytes(streams):
    _, before, _, _ = streams
    d = Decompressor(PredictorState.from_bytes(before))
    for junk in (b"", bytes(10), MAGIC):
        with pytest.raises(GradzipError):
            d.decompress(junk)


def test_streams_are_the_same_bytes_whether_their_frame_context_is_fresh_reused_or_open_twice(streams):
    """A finished stream's zstd context serves the next one on its thread (0.6 MiB less
    memory a stream); two streams open at once must each get their own, or their frames mix."""
    blob = streams[0]
    header, records, trailer = split_stream(blob)
    assert join_stream(header, records, trailer) == blob  # reused context (the fixture's was freed)
    first, second = io.BytesIO(), io.BytesIO()
    writers = [StreamWriter(first), StreamWriter(second)]
    for writer in writers:
        writer.header(header)
    for record, payload in records:
        for writer in writers:
            writer.record(record, payload)
    for writer in writers:
        writer.end(trailer)
    assert first.getvalue() == blob and second.getvalue() == blob


def test_streams_read_the_same_whether_their_frame_decompressor_is_fresh_reused_open_twice_or_abandoned(streams):
    """A finished reader's zstd decompressor serves the next one on its thread; two readers
    open at once must each get their own, and one left mid-stream (a damaged stream) must not
    hand back a decompressor that a later stream would then read wrongly."""
    blob = streams[0]
    expected = split_stream(blob)
    assert split_stream(blob) == expected  # reused
    readers = [StreamReader(io.BytesIO(blob), len(blob)) for _ in range(2)]
    assert readers[0].header() == readers[1].header() == expected[0]
    pairs = list(zip(readers[0].records(), readers[1].records()))  # the two streams' frames interleaved
    assert [a for a, _ in pairs] == [b for _, b in pairs] == expected[1] and readers[0].trailer == expected[2]
    cut = blob[: len(blob) - 40]
    with pytest.raises(CorruptStreamError):
        split_stream(cut)
    assert split_stream(blob) == expected


def test_frames_larger_than_the_frame_chunk_round_trip_and_chunking_leaves_no_trace(streams):
    """Frames are (de)compressed through 4 KiB output buffers: a frame that inflates to many
    times that (a header with 40 KB of metadata, a record with 300 extra parameters) must come
    back whole, and a stream's bytes must not depend on the chunk size."""
    from gradzip import container

    header, records, trailer = split_stream(streams[0])
    header = {**header, "metadata": {f"key{i:04d}": "x" * 40 for i in range(1000)}}
    record, payload = records[0]
    records = [({**record, "note": list(range(300))}, payload), *records[1:]]
    blob = join_stream(header, records, trailer)
    again_header, again_records, again_trailer = split_stream(blob)
    assert again_header == header and again_records == records and again_trailer == trailer
    chunk = container._FRAME_CHUNK
    try:
        container._FRAME_CHUNK = 1 << 20
        assert join_stream(header, records, trailer) == blob
    finally:
        container._FRAME_CHUNK = chunk


class _Trickle(io.RawIOBase):
    """A source that returns at most 7 bytes a read, as a pipe may."""

    def __init__(self, data: bytes):
        self._data, self._at = data, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 7 if n < 0 else min(n, 7)
        chunk = self._data[self._at : self._at + n]
        self._at += len(chunk)
        return chunk


@pytest.mark.parametrize("available", [True, False])
def test_a_source_returning_short_reads_decodes_the_same_and_its_truncation_is_caught(streams, available):
    blob, before, after, _ = streams
    decompressor = Decompressor(PredictorState.from_bytes(before))
    decoded = decompressor.decompress_from(_Trickle(blob), len(blob) if available else None)
    expected = Decompressor(PredictorState.from_bytes(before)).decompress(blob)
    assert all(np.array_equal(decoded.tensors[k], v, equal_nan=True) for k, v in expected.items())
    assert decompressor.state.to_bytes() == after and decoded.report.stream_bytes == len(blob)
    cut = blob[: len(blob) - 3]
    decompressor = Decompressor(PredictorState.from_bytes(before))
    with pytest.raises(CorruptStreamError, match="truncated"):
        decompressor.decompress_from(_Trickle(cut), len(cut) if available else None)
    assert decompressor.state.to_bytes() == before


@pytest.mark.parametrize("bad_params", [None, [], "x"])
def test_a_record_whose_params_are_not_a_map_is_refused_before_the_state_advances(bad_params):
    """The round's report is built when asked for, after the state has advanced: so
    everything it reads must have been checked while decoding. A record's params (a lossless
    record's decoding reads none of them) are the one part it reads that decoding did not."""
    rounds = small_rounds()
    for tensors in rounds:
        tensors["ids"] = np.arange(2000, dtype=np.int64)  # a lossless record of its own
    compressor = Compressor(1e-2, "rel")
    compressor.compress(rounds[0])
    before = compressor.state.to_bytes()
    blob = compressor.compress(rounds[1])
    header, records, trailer = split_stream(blob)
    assert any(record.get("method") == "lossless" for record, _ in records)
    decoded = Decompressor(PredictorState.from_bytes(before)).decompress_from(io.BytesIO(blob), len(blob))
    assert [t.name for t in decoded.report.tensors] == list(decoded.tensors) == list(rounds[1])
    for i, (record, payload) in enumerate(records):
        damaged = join_stream(header, [*records[:i], ({**record, "params": bad_params}, payload), *records[i + 1:]], trailer)
        decompressor = Decompressor(PredictorState.from_bytes(before))
        with pytest.raises(CorruptStreamError):
            decompressor.decompress(damaged)
        assert decompressor.state.to_bytes() == before, record.get("name", record.get("method"))


def test_a_source_whose_read_returns_none_is_a_truncated_stream(streams):
    """A non-blocking raw source returns None when it has nothing: that is the end of what
    the decoder gets, not a TypeError."""
    blob, before, _, header_end = streams

    class Dry(_Trickle):
        def read(self, n: int = -1):
            return super().read(n) or None

    for cut in (header_end, len(blob) - 5):  # a read that starts at the end, one that runs into it
        decompressor = Decompressor(PredictorState.from_bytes(before))
        with pytest.raises(CorruptStreamError, match="truncated"):
            decompressor.decompress_from(Dry(blob[:cut]))
        assert decompressor.state.to_bytes() == before


@pytest.mark.parametrize("before, after", [(b"", b" {}"), (b" ", b""), (b"", b"x"), (b"", b"\n")])
@pytest.mark.parametrize("pad", [0, 3000])
def test_a_frame_must_be_one_json_value_and_nothing_else(before, after, pad):
    """The reader scans a frame's JSON itself (no whitespace skipping): a value with anything
    before or after it is not a frame, whether it inflates in one step or, with a pad of
    random hex that zstd cannot shrink below container._INFLATE_STEP bytes, in several."""
    value = b'{"kind":"header","pad":"%s"}' % np.random.default_rng(pad).bytes(pad // 2).hex().encode()
    for text, valid in ((value, True), (before + value + after, False)):
        zstd = container._frame_compressor().compressobj()
        frame = zstd.compress(text) + zstd.flush()
        assert (len(frame) > container._INFLATE_STEP) == (pad > 0)
        frame = _varint(len(frame)) + frame
        blob = MAGIC + struct.pack("<H", FORMAT_VERSION) + frame + struct.pack("<I", zlib.crc32(frame))
        with pytest.raises(CorruptStreamError, match="header lacks" if valid else "JSON"):
            Decompressor().decompress(blob)


def test_a_padded_frame_length_is_refused_even_under_its_checksum():
    """A frame length is the shortest LEB128 encoding: `85 00` for 5 is damage, not a
    frame, though the checksum is recomputed over it."""
    blob = Compressor(1e-2).compress({"w": np.ones(2000, np.float32)})
    at = len(MAGIC) + 2
    length = blob[at]
    assert length < 0x80  # (a one-byte length, so the padded form is two bytes)
    frame = blob[at + 1 : at + 1 + length]
    padded = bytes([length | 0x80, 0]) + frame
    damaged = blob[:at] + padded + struct.pack("<I", zlib.crc32(padded)) + blob[at + 1 + length + 4 :]
    with pytest.raises(CorruptStreamError, match="non-canonical"):
        Decompressor().decompress(damaged)
    assert Decompressor().decompress(blob)["w"].shape == (2000,)


def test_a_stream_in_memory_reads_as_the_same_stream_from_a_file_object(streams):
    """Decompressor.decompress reads a bytes-like stream by slicing it (container.BufferReader);
    decompress_from reads a file object. Whole, cut at every length, with any byte flipped or
    with bytes after its end, both give the same tensors and state or the same error."""
    blob, before, _, _ = streams
    state = PredictorState.from_bytes(before)

    def outcome(read):
        d = Decompressor(state)
        try:
            tensors = read(d)
        except GradzipError as exc:
            return type(exc).__name__, str(exc)
        return {name: array.tobytes() for name, array in tensors.items()}, d.state.to_bytes()

    damaged = [blob, blob + b"\x00", blob + blob]
    damaged += [blob[:length] for length in range(len(blob))]
    for i in range(0, len(blob), 3):
        flipped = bytearray(blob)
        flipped[i] ^= 0x5A
        damaged.append(bytes(flipped))
    for data in damaged:
        in_memory = outcome(lambda d: d.decompress(data))
        from_file = outcome(lambda d: d.decompress_from(io.BytesIO(data), available=len(data)).tensors)
        assert in_memory == from_file, (len(data), in_memory, from_file)
    assert outcome(lambda d: d.decompress(memoryview(bytearray(blob)))) == outcome(lambda d: d.decompress(blob))


@pytest.mark.parametrize("obj", [
    {"kind": "tensor", "name": "conv.weight", "shape": [32, 16, 3, 3], "params": {"eb": 0.000980035, "weights": [0.128389, -1e-300],
                                                                              "flag": True, "none": None}},
    {"kind": "header", "metadata": {"caf\u00e9 \u2603": "line\nbreak \"quoted\"", "": ""}, "big": 2 ** 70, "tiny": 5e-324},
    {"kind": "end", "tensors": 0, "nested": [[[]], {}, [{"a": [1.5, -0.0]}]]},
])
def test_frame_json_is_what_json_dumps_gives(obj):
    # (the frame encoder is json's C encoder built once: the same text, byte for byte)
    assert container._frame_json(obj) == json.dumps(obj, separators=(",", ":"), allow_nan=False)


def test_frame_json_refuses_what_json_dumps_refuses_and_a_refusal_leaves_no_trace():
    for bad in ({"eb": float("nan")}, {"eb": [float("-inf")]}, {"x": object()}):
        with pytest.raises((ValueError, TypeError)):
            container._frame_json(bad)
    # A list that failed mid-way encodes once fixed: no stale circular-reference marker.
    inner = [1.0, object()]
    with pytest.raises(TypeError):
        container._frame_json({"x": inner})
    inner.pop()
    assert container._frame_json({"x": inner}) == '{"x":[1.0]}'


# Format 12: a record's check binds its layout and place, and its stream (codec.record_check).

def _layout_round(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(16, 8, 3, 3)).astype(np.float32),
            "bn.weight": rng.normal(size=16).astype(np.float32), "bn.bias": rng.normal(size=16).astype(np.float32),
            "fc.weight": rng.normal(size=(10, 32)).astype(np.float32),
            "bn.num_batches_tracked": np.array(123456789 + seed, np.int64),
            "token_counts": rng.integers(0, 1000, size=2048).astype(np.int64),
            "head.weight": rng.normal(size=(40, 40)).astype(np.float32)}


def _members(records) -> dict:
    return {member[1]: member for member in records[0][0]["members"]}


def _swap(records, i, j):
    records[i], records[j] = records[j], records[i]


LAYOUT_EDITS = {
    "bundle members' names swapped": lambda r: (_members(r)["bn.weight"].__setitem__(1, "bn.bias"),
                                                _members(r)["bn.bias"].__setitem__(1, "bn.weight")),
    "bundle member reshaped": lambda r: _members(r)["fc.weight"].__setitem__(3, [32, 10]),
    "exact bundle member read as another dtype": lambda r: _members(r)["bn.num_batches_tracked"].__setitem__(2, "F64"),
    "bundle members' positions swapped": lambda r: (_members(r)["bn.weight"].__setitem__(0, 2),
                                                    _members(r)["bn.bias"].__setitem__(0, 1)),
    "lossless record read as another dtype and shape": lambda r: [rec.update(dtype="I32", shape=[64, 64])
                                                                  for rec, _ in r if rec.get("name") == "token_counts"],
    "lossless record renamed": lambda r: [rec.update(name="other") for rec, _ in r if rec.get("name") == "token_counts"],
    "two records in each other's place": lambda r: _swap(r, 1, 2),
}


@pytest.mark.parametrize("edit", sorted(LAYOUT_EDITS))
def test_a_record_rewritten_to_another_layout_or_place_is_refused(edit):
    """Stateless tensors (the bundle's members, large non-float tensors) are in no state
    digest: before format 12 these rewrites, checksums recomputed, decoded without an error
    into tensors other than the compressor's reconstruction."""
    c = Compressor(1e-3, "rel")
    before = c.state
    header, records, trailer = split_stream(c.compress(_layout_round(0)))
    assert records[0][0]["method"] == "bundle" and len(records) >= 3
    LAYOUT_EDITS[edit](records)
    d = Decompressor(before)
    with pytest.raises(CorruptStreamError, match="checksum mismatch"):
        d.decompress(join_stream(header, records, trailer))
    assert d.state is before


def test_a_record_from_another_round_or_client_is_refused():
    """A record spliced in from another stream, checksums recomputed, fails its check: the
    check is keyed by its stream's round, state digest and input digest."""
    c = Compressor(1e-3, "rel")
    first = c.compress(_layout_round(0))
    state_after_first = c.state
    second = c.compress(_layout_round(1))
    other_client = Compressor(1e-3, "rel").compress(_layout_round(2))  # (round 0 of another client)
    header, records, trailer = split_stream(second)
    Decompressor(state_after_first).decompress(join_stream(header, records, trailer))  # (rebuilt as it was: decodes)
    stale = split_stream(first)[1][0]  # round 0's bundle (its biases and counters)
    with pytest.raises(CorruptStreamError, match="small-tensor bundle: reconstruction checksum mismatch"):
        Decompressor(state_after_first).decompress(join_stream(header, [stale] + records[1:], trailer))
    header0, records0, trailer0 = split_stream(first)
    foreign = split_stream(other_client)[1]
    name = "token_counts"
    swapped = [next(r for r in foreign if r[0].get("name") == name) if rec.get("name") == name else (rec, payload)
               for rec, payload in records0]
    with pytest.raises(CorruptStreamError, match=f"tensor '{name}': reconstruction checksum mismatch"):
        Decompressor().decompress(join_stream(header0, swapped, trailer0))
