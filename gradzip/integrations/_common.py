"""Pieces the framework adapters share.

- which arrays go lossy (float dtypes above a size cutoff);
- splitting one round's .grz stream into a head, one part per tensor and a tail, so a framework
  that ships one array per tensor can carry each tensor's bytes in its own array;
- the SZ3 baseline codec (through the optional `pysz` package), at the same per-tensor absolute
  bound gradzip uses;
- a digest of a set of arrays, so both ends can check they diffed against the same model;
- a state key as part of a state file's name.
"""
from __future__ import annotations

import hashlib
import io
import math
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from .. import codec
from ..api import Compressor
from ..container import StreamReader
from ..errors import CorruptStreamError, InputError
from ..state import PredictorState
from ..tensorio import is_bfloat16

CODECS = ("gradzip", "sz3")
MODES = ("rel", "abs")

# Stream metadata keys the adapters write into each round's .grz header.
META_RESET = "gradzip.reset"  # "1": the client dropped its predictor state before this round
META_CLIENT = "gradzip.client"  # the client key (APPFL) or node id (Flower)


def state_file_name(key: str) -> str:
    """A state key as part of a state file's name: percent-encoded, so that two keys never
    share a file and a server can read the key back from the name on a restart (keys of
    letters, digits and "-_.~" keep their names). Replacing other characters by "_" made
    "site 1" and "site_1" one file, and a Flower key "global model" came back as
    "global_model", which no client sends."""
    return urllib.parse.quote(key, safe="")


def fresh_digest() -> str:
    """The digest of an empty predictor state (what a client or server starts from)."""
    return PredictorState().digest()


def lossy_eligible(array: np.ndarray, min_elements: int) -> bool:
    """True for float arrays (F16, BF16, F32, F64) with more than `min_elements` elements."""
    if array.size <= min_elements:
        return False
    if is_bfloat16(array):
        return True
    return array.dtype.kind == "f" and array.dtype.itemsize in (2, 4, 8)


def make_compressor(error_bound: float, mode: str, min_elements: int, state: PredictorState | None = None,
                    **options) -> Compressor:
    """A gradzip Compressor whose lossy cutoff is `min_elements` (stored in each stream header)."""
    # Two rounds may legitimately carry identical updates (e.g. a frozen model): each
    # framework message is a new round, so never refuse one as a repeat.
    options.setdefault("allow_repeat", True)
    options.setdefault("report_errors", False)  # nobody reads them inside a framework
    return Compressor(error_bound=error_bound, mode=mode, state=state, min_lossy_elements=int(min_elements), **options)


def check_settings(codec: str, error_bound: float, mode: str, min_elements: int) -> None:
    if codec not in CODECS:
        raise InputError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
    if mode not in MODES:
        raise InputError(f"error-bound mode must be 'rel' or 'abs', not {mode!r}")
    if not isinstance(error_bound, (int, float)) or not math.isfinite(error_bound) or error_bound < 0:
        raise InputError(f"error bound must be a finite number >= 0, not {error_bound!r}")
    if mode == "rel" and error_bound >= 1:
        raise InputError(f"a relative error bound must be below 1, not {error_bound!r}")
    if not isinstance(min_elements, int) or min_elements < 0:
        raise InputError(f"min_elements must be an integer >= 0, not {min_elements!r}")
    if codec == "sz3":
        try:
            import pysz  # noqa: F401
        except ImportError:
            raise InputError("codec 'sz3' needs the optional pysz package (pip install pysz)") from None


def warm_up() -> None:
    """Compile or load gradzip's numba kernels now (about a second per process), so the first
    framework message does not pay for it. Optional: everything works without it."""
    from ..api import Decompressor

    values = np.sin(np.arange(4096, dtype=np.float32))
    compressor = make_compressor(1e-3, "rel", 1024)
    decompressor = Decompressor()
    for step in range(2):  # the second round exercises the predictors
        decompressor.decompress(compressor.compress({"w": values * (1 + 0.1 * step)}))


# ----------------------------------------------------------------- .grz stream split and join


@dataclass
class SplitStream:
    head: bytes  # magic, version and header frame
    parts: dict[str, bytes]  # per tensor: its record frame, payload and checksum, in stream order
    tail: bytes  # the end frame


def split_stream(blob: bytes) -> SplitStream:
    """Cut one round's stream into head, per-tensor parts and tail (join_stream undoes it)."""
    reader = StreamReader(io.BytesIO(blob), len(blob))
    reader.header()
    position = reader.bytes_read
    head = blob[:position]
    parts: dict[str, bytes] = {}
    for record, _payload in reader.records():
        end = reader.bytes_read
        parts[record["name"]] = blob[position:end]
        position = end
    return SplitStream(head, parts, blob[position:])


def join_stream(head: bytes, parts: Iterable[bytes], tail: bytes) -> bytes:
    return head + b"".join(parts) + tail


def stream_header(blob: bytes) -> dict:
    """The header frame of a stream (round, state digest, codec settings, metadata)."""
    header = StreamReader(io.BytesIO(blob), len(blob)).header()
    if not isinstance(header.get("metadata", {}), dict):
        raise CorruptStreamError("stream metadata is malformed")
    return header


# ----------------------------------------------------------------- SZ3 baseline


def absolute_bound(values: np.ndarray, error_bound: float, mode: str) -> float:
    """The tensor's absolute bound, computed by gradzip's own codec so SZ3 gets exactly the same."""
    flat = np.ascontiguousarray(values).reshape(-1)  # the codec works on flat values
    return codec.absolute_bound(flat, codec.CodecConfig(error_bound=error_bound, mode=mode))


def _sz3_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """SZ3 takes 1 to 4 dimensions: merge leading ones beyond four."""
    shape = tuple(int(s) for s in shape) or (1,)
    while len(shape) > 4:
        shape = (shape[0] * shape[1],) + shape[2:]
    return shape


def sz3_encode(values: np.ndarray, error_bound: float, mode: str) -> bytes | None:
    """SZ3 (pysz, ABS mode at the tensor's absolute bound); None when SZ3 cannot take it."""
    from pysz import sz, szConfig, szErrorBoundMode

    if values.dtype not in (np.float32, np.float64) or not np.isfinite(values).all():
        return None
    eb = absolute_bound(values, error_bound, mode)
    if not eb > 0:
        return None
    shaped = np.ascontiguousarray(values).reshape(_sz3_shape(values.shape))
    conf = szConfig(shaped.shape)
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.absErrorBound = eb
    compressed, _ratio = sz.compress(shaped, conf)
    return compressed.tobytes()  # pysz returns a view of its worst-case-sized buffer


def sz3_decode(data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    from pysz import sz

    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise CorruptStreamError(f"SZ3 payload claims unsupported dtype {dtype}")
    try:
        values, _conf = sz.decompress(np.frombuffer(data, np.uint8), dtype, _sz3_shape(shape))
    except Exception as exc:  # pysz raises plain RuntimeErrors on bad input
        raise CorruptStreamError(f"SZ3 payload cannot be decoded ({exc})") from None
    return np.asarray(values, dtype=dtype).reshape(shape).copy()


# ----------------------------------------------------------------- digests


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of names, dtypes, shapes and values; equal on both ends for the same model."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return digest.hexdigest()
