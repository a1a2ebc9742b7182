"""Python API: `Compressor` and `Decompressor`, each holding one client's predictor state.

    blob = Compressor(error_bound=1e-3, mode="rel").compress(tensors)   # one round
    tensors = Decompressor().decompress(blob)

A round either completes or leaves the state untouched: the new state replaces the old only
after the whole round has been encoded (or decoded and verified).
"""
from __future__ import annotations

import functools
import io
import json
import math
import operator
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import numpy as np

from . import __version__
from .codec import (DEFAULT_SEARCH_EVERY, MAX_ELEMENTS_PER_PAYLOAD_BYTE, MIN_LOSSY_ELEMENTS, CodecConfig, bundled,
                    carries_state, decode_bundle, decode_tensor, encode_bundle, encode_tensor, stream_key)
from .container import BufferReader, StreamReader, StreamWriter
from .errors import CorruptStreamError, GradzipWarning, InputError, StateMismatchError
from .floats import LOSSY_DTYPES
from .metrics import measure, psnr
from .parallel import available_cpus
from .predict.magnitude import DEFAULT_BETA
from .predict.sign import DEFAULT_TAU
from .checksum import fingerprint
from .state import PredictorState, TensorState, load_state, save_state
from .tensorio import READ_FORMATS, dtype_name, element_count, numpy_dtype


@dataclass
class TensorReport:
    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    predictor: str
    coder: str
    eb: float  # absolute bound used (0 for lossless)
    original_bytes: int
    compressed_bytes: int
    escaped: int
    ideal_code_bits: float
    max_abs_error: float | None = None  # known on the compressor side only
    sum_squared_error: float | None = None
    value_range: float | None = None
    variant: str = ""  # which signs and contexts the predictor used, e.g. "previous,scale_ema"

    @property
    def elements(self) -> int:
        return element_count(self.shape)


@dataclass
class RoundReport:
    round: int
    tensors: list[TensorReport] = field(default_factory=list)
    header: dict = field(default_factory=dict)

    @property
    def original_bytes(self) -> int:
        return sum(t.original_bytes for t in self.tensors)

    @property
    def compressed_bytes(self) -> int:
        return self.stream_bytes or sum(t.compressed_bytes for t in self.tensors)

    stream_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else math.inf

    @property
    def elements(self) -> int:
        return sum(t.elements for t in self.tensors)

    @property
    def bits_per_value(self) -> float:
        return 8 * self.compressed_bytes / self.elements if self.elements else 0.0

    @property
    def max_abs_error(self) -> float:
        errors = [t.max_abs_error for t in self.tensors if t.max_abs_error is not None]
        return max(errors, default=0.0)

    @property
    def psnr(self) -> float:
        """20 log10(range / RMSE) over the lossy-eligible float tensors of the round."""
        floats = [t for t in self.tensors if t.sum_squared_error is not None]
        count = sum(t.elements for t in floats)
        if not count:
            return math.inf
        mse = sum(t.sum_squared_error for t in floats) / count
        value_range = max(t.value_range for t in floats)
        return psnr(value_range, mse)


def tensors_digest(tensors: dict[str, np.ndarray]) -> str:
    """Fingerprint of a round's names, dtypes, shapes and bytes: catches a round passed twice."""
    # (the layout fixes each tensor's byte length, so the bytes need no separators)
    layout = tuple((name, dtype_name(array), array.shape) for name, array in tensors.items())
    return fingerprint([_layout_json(layout), *tensors.values()]).hex()


@functools.lru_cache(maxsize=64)
def _layout_json(layout: tuple) -> bytes:
    """JSON of a round's [name, dtype, shape] list: the same every round, and 10 us to dump."""
    return json.dumps([[name, dtype, list(shape)] for name, dtype, shape in layout]).encode()


# A tensor this small is coded in the calling thread: a worker's hand-off and the GIL cost
# more than its kernels run (all threads ran small models at 0.6x of one thread before).
THREADED_MIN_ELEMENTS = 1 << 16


def _checked_threads(threads) -> int:
    """A Compressor's or Decompressor's thread count: None or 0 (as before this check, and as
    zstd's -T0) mean every CPU the process may use; any other count is taken as given (more
    than the cores only costs memory: each thread keeps up to two tensors in flight)."""
    try:
        count = None if threads is None or isinstance(threads, bool) else operator.index(threads)
    except TypeError:
        count = None
    if threads is not None and (count is None or count < 0):
        raise InputError(f"threads must be a non-negative integer (0 or None: every CPU), not {threads!r}")
    return count or available_cpus()


def kernel_threads(elements: int, round_elements: int, threads: int) -> int:
    """Threads one tensor's kernels split their element ranges over: all of them only for a
    tensor the other tensors of its round cannot keep the threads busy beside (more than
    1/threads of the round's large-tensor elements), else one. Splitting every tensor while
    the tensors themselves run on the threads cost more than it gained: hand-offs and the
    GIL (12 layers of 196k-262k elements, two threads: 1.18x one thread's compression with
    every tensor split, see docs/performance.md). Any split gives the same bits."""
    return threads if elements * threads > round_elements else 1


class _Inline:
    """A call made in the consuming thread when its result is wanted, in a pool's queue."""

    def __init__(self, function, item):
        self.function, self.item = function, item

    def result(self):
        return self.function(self.item)

    def cancel(self):
        return True


@contextmanager
def ordered_map(function, items, threads: int, threaded=lambda item: True):
    """function over items on up to `threads` threads, as an iterator of results in order that
    is valid inside the with block; items that are not `threaded` run in the consuming thread,
    in turn, while the others run on. At most 2 x threads items are in flight, so memory stays a
    small multiple of the largest tensor. Leaving the block, by an exception or Ctrl-C too,
    cancels what is pending and waits for the running calls: no worker outlives the round (a
    generator left suspended would shut its pool down only when collected, at exit)."""
    if threads <= 1:
        yield map(function, items)
        return
    window = 2 * threads
    pending = deque()

    def results(pool):
        for item in items:
            pending.append(pool.submit(function, item) if threaded(item) else _Inline(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    with ThreadPoolExecutor(max_workers=threads) as pool:
        try:
            yield results(pool)
        finally:
            for future in pending:
                future.cancel()


def _record_elements(record: dict) -> int:
    """Elements a tensor record claims, or 0 where its shape is malformed (decoding says why)."""
    shape = record.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return 0
    return math.prod(shape)


def _checked_state(state) -> PredictorState:
    """A Compressor's or Decompressor's starting state: a fresh one for None."""
    if state is None:
        return PredictorState()
    if not isinstance(state, PredictorState):
        raise InputError(f"state must be a PredictorState (gradzip.state.load_state), not a {type(state).__name__}")
    return state


def _checked_tensors(tensors: dict) -> dict[str, np.ndarray]:
    """The round's tensors, numpy scalars as 0-d arrays; anything unusable is an InputError."""
    if not isinstance(tensors, dict):
        raise InputError(f"a round is a dict of name -> numpy array, not a {type(tensors).__name__}")
    tensors = {name: np.asarray(a) if isinstance(a, np.generic) else a for name, a in tensors.items()}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name:
            raise InputError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise InputError(f"tensor {name!r} is a {type(array).__name__}, not a numpy array")
        if isinstance(array, np.ma.MaskedArray):  # (its mask would be lost: the data under it is compressed)
            raise InputError(f"tensor {name!r} is a masked array: pass .filled(value) or its .data")
        dtype_name(array)
    return tensors


class Compressor:
    """Compresses one client's rounds in order, carrying the predictor state between them.

    low_rank=False skips the low-rank part on large layers: faster there (two fits of 25-35 ms
    a round on a 1M-element layer), larger streams where it would have applied.
    search_every: every tensor tries every candidate on its first two rounds with history and
    every search_every-th round after them; in between it rebuilds the last round's recipe (refitted),
    which compresses faster for slightly larger streams (1: search every round)."""

    def __init__(self, error_bound: float = 1e-3, mode: str = "rel", *, beta: float = DEFAULT_BETA,
                 tau: float = DEFAULT_TAU, magnitude_prediction: bool = True, sign_prediction: bool = True,
                 coder: str = "rans", state: PredictorState | None = None, allow_repeat: bool = False,
                 report_ideal_bits: bool = False, threads: int | None = None,
                 min_lossy_elements: int = MIN_LOSSY_ELEMENTS, exact_small: bool = False,
                 report_errors: bool = True, low_rank: bool = True, search_every: int = DEFAULT_SEARCH_EVERY):
        self.allow_repeat = allow_repeat
        if not isinstance(low_rank, bool):
            raise InputError(f"low_rank must be a bool, not {low_rank!r}")
        if not isinstance(search_every, int) or isinstance(search_every, bool) or search_every < 1:
            raise InputError(f"search_every must be an integer >= 1, not {search_every!r}")
        # encoder's choices (speed against ratio): decoding needs no setting
        self.low_rank = low_rank
        self.search_every = search_every
        self.threads = _checked_threads(threads)  # tensors encoded at once
        self.report_ideal_bits = report_ideal_bits  # costs an extra pass per tensor; for benchmarks
        self.report_errors = report_errors  # max error and PSNR in last_report: one more pass per tensor
        self.config = CodecConfig(error_bound=error_bound, mode=mode, beta=beta, tau=tau,
                                  magnitude_prediction=magnitude_prediction, sign_prediction=sign_prediction,
                                  coder=coder, min_lossy_elements=min_lossy_elements, exact_small=exact_small)
        self.state = _checked_state(state)
        self.last_report: RoundReport | None = None

    def compress(self, tensors: dict[str, np.ndarray], *, source_format: str = "safetensors",
                 metadata: dict[str, str] | None = None) -> bytes:
        """Compress one round; returns the .grz stream and advances the state."""
        out = io.BytesIO()
        self.compress_to(tensors, out, source_format=source_format, metadata=metadata)
        return out.getvalue()

    def compress_to(self, tensors: dict[str, np.ndarray], out: BinaryIO, *, source_format: str = "safetensors",
                    metadata: dict[str, str] | None = None,
                    on_tensor: Callable[[str], None] | None = None) -> RoundReport:
        """Stream one round to `out`, one tensor at a time; the state advances only at the end."""
        tensors = _checked_tensors(tensors)
        if source_format not in READ_FORMATS:
            raise InputError(f"unknown source format {source_format!r}")
        metadata = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise InputError("metadata must map strings to strings (as safetensors metadata does)")
        before = self.state
        input_digest = tensors_digest(tensors)
        if input_digest == before.last_input_digest and not self.allow_repeat:
            raise InputError(f"this input is identical to round {before.round - 1}, which this state already holds: "
                             "a round compressed twice would desynchronize the receiver (allow_repeat / --allow-repeat "
                             "if it really is a new round)")
        header = {"round": before.round, "state_digest": before.digest(), "input_digest": input_digest,
                  "codec": self.config.to_dict(),
                  "source_format": source_format, "metadata": metadata,
                  "tensor_count": len(tensors), "created_by": f"gradzip {__version__}"}
        counter = _CountingWriter(out)
        writer = StreamWriter(counter)
        writer.header(header)
        report = RoundReport(before.round, header=header)
        new_tensors = dict(before.tensors)
        small, large = [], []
        for position, (name, array) in enumerate(tensors.items()):
            _warn_if_reset(name, before.tensors.get(name), array, self.config)
            if bundled(dtype_name(array), tuple(array.shape), self.config):
                small.append((position, name, array))
            else:
                large.append((position, name, array))
        reports = {}
        key = stream_key(before.round, header["state_digest"], input_digest)  # (each record's check binds it)
        if small:
            bundle = encode_bundle(small, self.config, key, 0)
            writer.record(bundle.record, bundle.payload)
            originals = {name: array for _, name, array in small}
            member_reports = _bundle_member_reports(bundle.record, len(bundle.payload), originals, bundle.recons,
                                                    self.report_errors)
            for position, name, _ in small:
                reports[position] = member_reports[name]
                if on_tensor:
                    on_tensor(name)

        round_elements = sum(array.size for _, _, array in large)

        first_index = 1 if small else 0  # (the records' places in the stream: the bundle's first)

        def encode(item):
            index, (_, name, array) = item
            return encode_tensor(name, array, self.config, before.tensors.get(name), self.report_ideal_bits,
                                 kernel_threads(array.size, round_elements, self.threads), self.low_rank,
                                 self.search_every, key, index)

        with ordered_map(encode, list(enumerate(large, first_index)), self.threads,
                         lambda item: item[1][2].size >= THREADED_MIN_ELEMENTS) as encoded_tensors:
            for (position, name, array), encoded in zip(large, encoded_tensors):
                writer.record(encoded.record, encoded.payload)
                if encoded.state is not None:
                    new_tensors[name] = encoded.state
                reports[position] = _report(encoded, array, self.report_errors)
                del encoded  # its reconstruction and payload, before the next tensor is encoded
                if on_tensor:
                    on_tensor(name)
        report.tensors = [reports[position] for position in sorted(reports)]
        after = PredictorState(before.round + 1, new_tensors, input_digest)
        writer.end({"tensors": len(tensors), "state_digest": after.digest()})
        report.stream_bytes = counter.count
        self.state = after
        self.last_report = report
        return report

    def save_state(self, path: str | os.PathLike) -> None:
        save_state(self.state, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Replace the state with a saved one; a missing file is an error (a typo silently
        started round 0 over)."""
        self.state = load_state(path, create=False)


def _warn_if_reset(name, previous: TensorState | None, array, config) -> None:
    if previous is None:
        return
    dtype = dtype_name(array)
    if previous.shape != tuple(array.shape) or previous.dtype != dtype:
        if carries_state(dtype, tuple(array.shape), config):
            warnings.warn(f"tensor {name!r} changed from {previous.dtype}{list(previous.shape)} to "
                          f"{dtype}{list(array.shape)}: its prediction restarts", GradzipWarning, stacklevel=3)


def _bundle_member_reports(record: dict, payload_bytes: int, originals: dict | None = None,
                           recons: dict | None = None, with_errors: bool = True) -> dict[str, TensorReport]:
    """Reports for a bundle's members; each is charged its share of the payload by original
    size. Errors are measured only where both the originals and the reconstructions are known."""
    reports = {}
    members = record["members"]
    sizes = [element_count(shape) * numpy_dtype(dtype).itemsize for _, _, dtype, shape, _ in members]
    total = max(sum(sizes), 1)
    exact_coder = "zstd" if record["params"]["zstd"] else "raw"
    measured = with_errors and originals is not None and recons is not None
    for (_, name, dtype, shape, eb), original_bytes in zip(members, sizes):
        figures = measure(originals[name], recons[name], dtype, eb) if measured and dtype in LOSSY_DTYPES else None
        quantized = eb > 0
        reports[name] = TensorReport(
            name=name, shape=tuple(shape), dtype=dtype, method="quantized" if quantized else "lossless",
            predictor="none" if quantized else "-", coder="rans" if quantized else exact_coder, eb=eb,
            original_bytes=original_bytes, compressed_bytes=round(payload_bytes * original_bytes / total), escaped=0,
            ideal_code_bits=0.0, max_abs_error=figures.max_abs_error if figures else None,
            sum_squared_error=figures.sum_squared_error if figures else None,
            value_range=figures.value_range if figures else None)
    return reports


def _report(encoded, original, with_errors: bool) -> TensorReport:
    record = encoded.record
    params = record["params"]
    float_tensor = record["dtype"] in LOSSY_DTYPES and with_errors
    figures = measure(original, encoded.recon, record["dtype"], params.get("eb", 0.0)) if float_tensor else None
    return TensorReport(
        name=record["name"], shape=tuple(record["shape"]), dtype=record["dtype"], method=record["method"],
        predictor=params.get("predictor", "-"), coder=params.get("coder", "zstd"), eb=params.get("eb", 0.0),
        original_bytes=original.nbytes, compressed_bytes=len(encoded.payload), escaped=params.get("escaped", 0),
        ideal_code_bits=encoded.ideal_code_bits, max_abs_error=figures.max_abs_error if figures else None,
        sum_squared_error=figures.sum_squared_error if figures else None,
        value_range=figures.value_range if figures else None, variant=_variant(params))


def _variant(params: dict) -> str:
    """The weights, signs and contexts a quantized record's predictor used, for reports."""
    rows = ["rows"] if params.get("weights") == "rows" else []
    rank = [f"rank{params['rank']}"] if "rank" in params else []
    return ",".join(rows + rank + [str(params[key]) for key in ("signs", "contexts") if key in params])


class _CountingWriter:
    def __init__(self, out: BinaryIO):
        self._out = out
        self.count = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self.count += len(data)


@dataclass
class DecodedRound:
    tensors: dict[str, np.ndarray]
    header: dict
    records: list = field(repr=False)  # (record, payload bytes) in stream order, for the report
    stream_bytes: int = 0

    @functools.cached_property
    def report(self) -> RoundReport:
        """Per-tensor sizes and settings, in round order: built when asked for (a library
        caller who only wants the tensors skips 5% of a small model's decompression)."""
        reports: dict[str, TensorReport] = {}
        for record, payload_bytes in self.records:
            if record.get("method") == "bundle":
                reports.update(_bundle_member_reports(record, payload_bytes))
            else:
                reports[record["name"]] = _record_report(record, payload_bytes)
        report = RoundReport(self.header["round"], [reports[name] for name in self.tensors], self.header)
        report.stream_bytes = self.stream_bytes
        return report


class Decompressor:
    """Decompresses one client's rounds in order; its state must match the compressor's."""

    def __init__(self, state: PredictorState | None = None, threads: int | None = None):
        self.state = _checked_state(state)
        self.threads = _checked_threads(threads)  # tensors decoded at once

    def decompress(self, blob: bytes) -> dict[str, np.ndarray]:
        """One round's tensors, as decompress_from gives them (read-only arrays)."""
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise InputError(f"a stream is bytes, not a {type(blob).__name__}")
        return self._decoded(BufferReader(blob), advance=True).tensors

    def decompress_from(self, source: BinaryIO, available: int | None = None, *, advance: bool = True) -> DecodedRound:
        """Decode one stream; with advance=False the state is only read (e.g. for `stats`).
        The arrays are read-only: a float32 tensor's is its new state's last reconstruction
        (np.array(t) gives a writable copy)."""
        return self._decoded(StreamReader(source, available), advance)

    def _decoded(self, reader: StreamReader, advance: bool) -> DecodedRound:
        header = reader.header()
        try:
            config = CodecConfig.from_dict(header["codec"])
            stream_round, stream_digest = header["round"], header["state_digest"]
            source_format = header["source_format"]
            input_digest = str(header["input_digest"])
            metadata = header["metadata"]
        except KeyError as exc:
            raise CorruptStreamError(f"header lacks {exc}") from None
        if source_format not in READ_FORMATS:
            raise CorruptStreamError(f"unknown source format {source_format!r}")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CorruptStreamError("header metadata is not a map of strings")
        check_state(self.state, stream_round, stream_digest)
        key = stream_key(self.state.round, stream_digest, input_digest)  # (the round as the state holds it)
        new_tensors = dict(self.state.tensors)
        arrays: dict[str, np.ndarray] = {}
        bundle_positions: dict[int, str] = {}
        stream_order: list[str] = []  # tensors with records of their own, in stream order
        claimed: set[str] = set()
        records: list[tuple[dict, int]] = []

        def claim(name) -> None:
            if not isinstance(name, str):
                raise CorruptStreamError("tensor record without a name")
            if name in claimed:
                raise CorruptStreamError(f"tensor {name!r} appears twice")
            claimed.add(name)

        def tensor_records():
            for index, (record, payload) in enumerate(reader.records()):
                records.append((record, len(payload)))
                if record.get("method") == "bundle":
                    for position, name, array in decode_bundle(record, payload, key, index):
                        claim(name)
                        if position in bundle_positions:
                            raise CorruptStreamError("two bundle members at one position")
                        bundle_positions[position] = name
                        arrays[name] = array
                    continue
                claim(record.get("name"))
                yield record, payload, index

        # The records arrive one by one, so the round's size is the state's (the same model's
        # last round; none on a first round, whose tensors then each take every thread).
        round_elements = sum(tensor.ema.size for tensor in self.state.tensors.values())

        def decode(item):
            record, payload, index = item
            threads = kernel_threads(_record_elements(record), round_elements, self.threads)
            return record, decode_tensor(record, payload, config, self.state.tensors.get(record["name"]), threads, key, index)

        with ordered_map(decode, tensor_records(), self.threads,
                         lambda item: _record_elements(item[0]) >= THREADED_MIN_ELEMENTS) as decoded_tensors:
            for record, (array, state) in decoded_tensors:
                name = record["name"]
                arrays[name] = array
                stream_order.append(name)
                if state is not None:
                    new_tensors[name] = state
        tensors = _in_round_order(bundle_positions, stream_order, arrays)
        reader.expect_end_of_input()
        after = PredictorState(self.state.round + 1, new_tensors, input_digest)
        trailer = reader.trailer
        if trailer.get("tensors") != len(tensors) or header.get("tensor_count") != len(tensors):
            raise CorruptStreamError("tensor count does not match the header")
        if trailer.get("state_digest") != after.digest():
            raise CorruptStreamError("state after decoding differs from the compressor's (digest mismatch)")
        if advance:
            self.state = after
        for array in tensors.values():
            # A float32 tensor's array is its new state's last reconstruction (4 bytes an
            # element less, for the call and for as long as the caller keeps it): read-only,
            # like every array returned, so that writing to it raises instead of changing
            # what the next round predicts from.
            array.flags.writeable = False
        return DecodedRound(tensors, header, records, reader.bytes_read)

    def save_state(self, path: str | os.PathLike) -> None:
        save_state(self.state, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Replace the state with a saved one; a missing file is an error (a typo silently
        started round 0 over)."""
        self.state = load_state(path, create=False)


def _in_round_order(bundle_positions: dict[int, str], stream_order: list[str], arrays: dict) -> dict[str, np.ndarray]:
    """Bundle members sit at their recorded positions; the other tensors fill the free ones in
    order. (One list and plain loops: the generators this had cost 10 us on 20 tensors.)"""
    total = len(bundle_positions) + len(stream_order)
    names: list = [None] * total
    for position, name in bundle_positions.items():
        if position >= total:
            raise CorruptStreamError("bundle member position out of range")
        names[position] = name
    own = iter(stream_order)
    for position in range(total):
        if names[position] is None:
            names[position] = next(own)
    return {name: arrays[name] for name in names}


def check_state(state: PredictorState, stream_round, stream_digest) -> None:
    """Refuse a state other than the one the stream was encoded against, saying which is which."""
    if stream_round == state.round and stream_digest == state.digest():
        return
    found = f"state is at round {state.round} (digest {state.digest()})"
    expected = f"stream was encoded against round {stream_round} (digest {stream_digest})"
    if isinstance(stream_round, int) and stream_round > state.round:
        hint = "decompress the earlier rounds first"
    elif isinstance(stream_round, int) and stream_round < state.round:
        hint = "this round was already decompressed with this state, or the state is newer"
    else:
        hint = "the state belongs to another client or run"
    raise StateMismatchError(f"{expected}, but the {found}: {hint}")


def _plausible_shape(shape, payload_bytes: int) -> bool:
    """Whether a record's shape could be what it says, by the decoder's rules: counts that
    are ints from 0, and at most MAX_ELEMENTS_PER_PAYLOAD_BYTE elements a payload byte (a
    shape of 10**200 or Infinity once overflowed `stats`, which decodes nothing)."""
    return (all(type(size) is int and size >= 0 for size in shape)
            and element_count(shape) <= (payload_bytes + 1) * MAX_ELEMENTS_PER_PAYLOAD_BYTE)


def _record_report(record: dict, payload_bytes: int) -> TensorReport:
    """Sizes and settings of one tensor as its record states them."""
    try:
        params = record["params"]
        dtype = record["dtype"]
        shape = tuple(record["shape"])
        if not _plausible_shape(shape, payload_bytes):
            raise ValueError("implausible shape")
        n = element_count(shape)
        return TensorReport(
            name=record["name"], shape=shape, dtype=dtype, method=record["method"],
            predictor=params.get("predictor", "-"), coder=params.get("coder", "zstd"), eb=params.get("eb", 0.0),
            original_bytes=n * numpy_dtype(dtype).itemsize, compressed_bytes=payload_bytes,
            escaped=params.get("escaped", 0), ideal_code_bits=0.0, variant=_variant(params))
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, InputError):
        raise CorruptStreamError(f"tensor {record.get('name', '?')!r}: malformed record") from None


def _well_typed(tensor: TensorReport) -> bool:
    """Whether a report read off a record has the types a writer gives its fields (a decoder
    refuses others; describe_stream does not decode)."""
    strings = (tensor.name, tensor.dtype, tensor.method, tensor.predictor, tensor.coder)
    return (all(isinstance(value, str) for value in strings) and isinstance(tensor.eb, float) and tensor.eb >= 0
            and type(tensor.escaped) is int and all(type(size) is int for size in tensor.shape))


def describe_stream(source: BinaryIO, available: int | None = None) -> RoundReport:
    """Per-tensor sizes of a stream, read from its records without decoding (no state needed)."""
    reader = StreamReader(source, available)
    header = reader.header()
    report = RoundReport(header.get("round", -1), header=header)
    for record, payload in reader.records():
        if record.get("method") == "bundle":
            try:
                shapes = [member[3] for member in record["members"]]
                if not all(_plausible_shape(shape, len(payload)) for shape in shapes):
                    raise ValueError("implausible shape")
                if sum(element_count(shape) for shape in shapes) > (len(payload) + 1) * MAX_ELEMENTS_PER_PAYLOAD_BYTE:
                    raise ValueError("members too large for the payload")  # (the decoder's limit on them all)
                report.tensors += _bundle_member_reports(record, len(payload)).values()
            except (KeyError, TypeError, ValueError, IndexError, OverflowError, InputError):
                raise CorruptStreamError("small-tensor bundle: malformed record") from None
        else:
            report.tensors.append(_record_report(record, len(payload)))
    for tensor in report.tensors:  # (nothing is decoded here: the fields shown are checked instead)
        if not _well_typed(tensor):
            raise CorruptStreamError(f"tensor {tensor.name!r}: malformed record")
    reader.expect_end_of_input()
    report.stream_bytes = reader.bytes_read
    return report
