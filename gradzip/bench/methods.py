"""One small adapter per benchmarked method.

A method makes a *session* per (sequence, error bound). A session compresses one round at a
time, carrying whatever state the method keeps across rounds, and decompresses in the same
order. Every session is handed the same per-tensor absolute bounds by the runner:

    session.compress(tensors, bounds) -> Packed      bounds: {name: absolute eb}
    session.decompress(packed)        -> {name: array}

An error-bounded baseline (SZ3, ZFP) derives them again inside its compress call, with the
runner's own function, as gradzip does from its mode and eb: the value-range pass is timed for
every method alike (coding_bounds).

Routing shared by every method: float tensors with a bound above 0 are coded lossily; a small
one (at most `lossy_limit` elements) only where its lossy stream is smaller than its raw bytes,
as SZ3 and ZFP headers can outweigh a tiny tensor. The other small tensors share one zstd frame
per round (stored raw if zstd does not shrink them); larger non-float tensors and tensors whose
bound is 0 (constant, or no finite value) get a zstd frame each. (gradzip routes internally, see
gradzip/codec.py: its small float tensors share one rANS stream in the bundle record.) F16/BF16 tensors are widened to float32 for the baselines and narrowed
back afterwards (the bound is checked after narrowing).

What each method is charged: gradzip the whole .grz stream of the round (header, per-tensor
records and checksums included; `container_bytes` reports that overhead). The baselines only
their payloads: SZ3's and ZFP's streams carry their own small headers, but no framing for
names or shapes is counted, which is the cheapest any framework could ship them.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

QSGD_LEVELS = 255


@dataclass
class Packed:
    """One compressed round."""

    data: object  # method-specific
    nbytes: int  # bytes the method would send for this round
    tensor_bytes: dict[str, int]  # per tensor (gradzip: payload only, framing excluded)
    used_bounds: dict[str, float]  # absolute bound each tensor was coded under; 0.0 = stored exactly
    payload_bytes: int | None = None  # without the method's own framing (None: describe() says, or nbytes)


class Session:
    """Compresses and decompresses one client's rounds in order."""

    def compress(self, tensors: dict[str, np.ndarray], bounds: dict[str, float]) -> Packed:
        raise NotImplementedError

    def decompress(self, packed: Packed) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # Stateful sessions return and accept their state, so a round can be timed several times.
    def snapshot(self):
        return None

    def restore(self, snapshot) -> None:
        pass

    def describe(self, packed: Packed) -> dict:
        """Method-specific figures of a round, computed outside the timed region."""
        return {}


@dataclass(frozen=True)
class Method:
    name: str  # as given to --methods
    label: str
    family: str
    error_bounded: bool
    description: str
    requires: tuple[str, ...]  # modules that must import
    make: Callable[..., Session] = field(repr=False)  # make(mode, error_bound, lossy_limit, seed)

    def missing(self) -> str | None:
        """Why the method cannot run here, or None."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                return f"{module} is not installed ({exc})" if "No module named" not in str(exc) else f"{module} is not installed"
        return None


# ---------------------------------------------------------------- gradzip


def blas_one_thread():
    """Hold numpy's BLAS (the low-rank part's matrix products) to one thread
    (threadpoolctl, from the bench extra; without it the BLAS keeps its own thread count):
    a single-threaded figure is then one core's, and with gradzip's own threads the BLAS
    does not fight them (on cnn5fc 2 threads ran at 1.28x of one with a one-thread BLAS and
    0.98x with a two-thread one: OpenBLAS's waiting threads spin on the cores gradzip uses).
    `gradzip bench` and benchmarks/run.py already start OpenBLAS with one thread
    (gradzip/blas.py); this covers a bench run from other code. The runner holds it over a
    whole run, not per timed call: entering it takes about 9 us, 1% of a small model's
    decompression, which no other method's calls paid."""
    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """One controller for the run: threadpool_limits() rescans the process's libraries on
    every call, about 1 ms in the bench's process, as long as a small model's decompression."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


class GradzipSession(Session):
    """One Compressor and one Decompressor across all rounds (gradzip's state spans rounds).

    threads=1 (the default here) encodes one tensor at a time, to compare with single-threaded
    SZ3; threads=None lets gradzip use every core. numpy's BLAS runs on one thread either way
    (see blas_one_thread, which the runner holds). The ideal code length is measured in a
    separate, untimed re-encoding of the round from the same state (report_ideal_bits costs an
    extra pass), which must give the same bytes.
    """

    def __init__(self, mode: str, error_bound: float, *, magnitude: bool = True, sign: bool = True,
                 threads: int | None = 1):
        from ..api import Compressor, Decompressor

        self._settings = dict(error_bound=error_bound, mode=mode, magnitude_prediction=magnitude, sign_prediction=sign)
        self._threads = threads
        # Error figures are the bench's own job, for every method alike. A round equal to the
        # one before (a frozen layer's zero update, say) is a round like any other here.
        self.compressor = Compressor(**self._settings, **_supported(Compressor, threads=threads, report_errors=False,
                                                                    allow_repeat=True))
        self.decompressor = Decompressor(**_supported(Decompressor, threads=threads))

    def compress(self, tensors, bounds) -> Packed:
        before = self.compressor.state
        blob = self.compressor.compress(tensors)
        report = self.compressor.last_report
        used = {t.name: (float(t.eb) if t.method == "quantized" else 0.0) for t in report.tensors}
        sizes = {t.name: t.compressed_bytes for t in report.tensors}
        return Packed((blob, report, before, tensors), len(blob), sizes, used)

    def decompress(self, packed: Packed):
        return self.decompressor.decompress(packed.data[0])

    def snapshot(self):
        # A round replaces the state objects rather than mutating them (gradzip/api.py).
        return self.compressor.state, self.decompressor.state

    def restore(self, snapshot) -> None:
        self.compressor.state, self.decompressor.state = snapshot

    def describe(self, packed: Packed) -> dict:
        import io

        from ..api import Compressor
        from ..container import StreamReader

        blob, report, before, tensors = packed.data
        ideal = {t.name: t.ideal_code_bits for t in report.tensors}
        extra = _supported(Compressor, report_ideal_bits=True, threads=1, allow_repeat=True)
        if "report_ideal_bits" in extra:
            again = Compressor(**self._settings, state=before, **extra)
            if len(again.compress(tensors)) == len(blob):
                ideal = {t.name: t.ideal_code_bits for t in again.last_report.tensors}
            else:
                ideal = {}  # not reproducible: report no efficiency rather than a wrong one
        predictors: dict[str, int] = {}
        coders: dict[str, int] = {}
        code_bytes = 0
        ideal_bits = 0.0
        payload_bytes = 0
        escaped = 0
        reader = StreamReader(io.BytesIO(blob), len(blob))
        reader.header()
        for record, payload in reader.records():
            payload_bytes += len(payload)
            if record["method"] != "quantized":
                kind = "bundle" if record["method"] == "bundle" else "lossless"
                predictors[kind] = predictors.get(kind, 0) + 1
                continue
            params = record["params"]
            predictors[params["predictor"]] = predictors.get(params["predictor"], 0) + 1
            coders[params["coder"]] = coders.get(params["coder"], 0) + 1
            escaped += int(params.get("escaped", 0))
            if params["coder"] == "rans" and ideal.get(record["name"]):
                sections = dict((name, length) for name, length in record["sections"])
                code_bytes += sections["codes"]
                ideal_bits += ideal[record["name"]]
        return {"predictors": predictors, "coders": coders, "rans_code_bytes": code_bytes,
                "rans_ideal_code_bits": ideal_bits, "payload_bytes": payload_bytes,
                "container_bytes": len(blob) - payload_bytes, "escaped": escaped}


def _supported(cls, **kwargs) -> dict:
    """The keyword arguments cls accepts (the core API grows; the bench should not break on it)."""
    import inspect

    parameters = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if k in parameters}


def _gradzip(magnitude: bool, sign: bool, threads: int | None = 1):
    def make(mode, error_bound, lossy_limit, seed):
        return GradzipSession(mode, error_bound, magnitude=magnitude, sign=sign, threads=threads)
    return make


# ---------------------------------------------------------------- per-tensor baselines


class PerTensorSession(Session):
    """A baseline that codes each float tensor on its own (subclasses code one float array);
    a small one only where that beats its raw bytes, the other small tensors share one zstd frame."""

    lossy = True  # False: every tensor goes through zstd
    # An error-bounded baseline derives each tensor's bound inside its timed compression, as
    # gradzip does in rel mode (a user of SZ3's REL mode pays for the value range too): with
    # the bound handed in, a small CNN's SZ3 round skipped 4% of its work that gradzip's did.
    derives_bounds = True

    def __init__(self, lossy_limit: int, seed: int, mode: str, error_bound: float):
        """mode and error_bound: the bench's (coding_bounds derives each tensor's from them)."""
        import zstandard

        from ..lossless import DEFAULT_LEVEL

        self.lossy_limit = lossy_limit
        self.seed = seed
        self.mode, self.error_bound = mode, error_bound
        self.round = 0
        self._zstd = zstandard.ZstdCompressor(level=DEFAULT_LEVEL)
        self._unzstd = zstandard.ZstdDecompressor()

    def coding_bounds(self, tensors, bounds: dict[str, float]) -> dict[str, float]:
        """Each tensor's bound: derived from the tensor (with the bench's own function, so the
        runner's check that it coded at the bench's bound holds), or the bench's."""
        if not (self.lossy and self.derives_bounds):
            return bounds
        from .runner import tensor_bounds

        return tensor_bounds(tensors, self.mode, self.error_bound)

    # subclasses: values is a flat-or-shaped float32/float64 C-contiguous array
    def encode(self, values: np.ndarray, eb: float, index: int) -> bytes:
        raise NotImplementedError

    def decode(self, data: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def compress(self, tensors, bounds) -> Packed:
        # Only the baseline's own work inside the timed call: no copy of a tensor that goes to
        # the lossy coder (building every tensor's raw bytes first, with pysz imported per
        # tensor, cost SZ3 5-10% of its timed call; review of 2026-11-29).
        from ..floats import LOSSY_DTYPES, original_bits, widen
        from ..tensorio import dtype_name

        bounds = self.coding_bounds(tensors, bounds)
        items = {}
        sizes = dict.fromkeys(tensors, 0)  # in the round's order
        used = dict.fromkeys(tensors, 0.0)
        small = []
        for index, (name, array) in enumerate(tensors.items()):
            dtype = dtype_name(array)
            eb = float(bounds.get(name, 0.0))
            if self.lossy and dtype in LOSSY_DTYPES and array.size and eb > 0 and math.isfinite(eb):
                data = self.encode(widen(array, dtype).reshape(array.shape), eb, index)
                if array.size > self.lossy_limit or len(data) < array.nbytes:
                    items[name] = ("lossy", data, dtype, array.shape)
                    used[name] = eb
                    sizes[name] = len(data)
                    continue
            raw = original_bits(array, dtype) if dtype in LOSSY_DTYPES else _le_bytes(array)
            if array.size <= self.lossy_limit:
                small.append((name, raw, dtype, array.shape, array.dtype))
            else:
                data = self._zstd.compress(raw)
                items[name] = ("zstd", data, dtype, array.shape, array.dtype)
                sizes[name] = len(data)
        bundle = b""
        if small:  # like gradzip: one zstd frame for all small tensors, or raw if zstd does not help
            raw = b"".join(member[1] for member in small)
            packed = self._zstd.compress(raw)
            bundle = packed if len(packed) < len(raw) else raw
            members = [(name, member_raw.nbytes, dtype, shape, np_dtype) for name, member_raw, dtype, shape, np_dtype in small]
            items[_BUNDLE] = (len(packed) < len(raw), bundle, members)
            for name, member_raw, *_ in small:
                sizes[name] = round(len(bundle) * member_raw.nbytes / max(len(raw), 1))  # its share, as gradzip reports it
        self.round += 1
        payload = len(bundle) + sum(len(item[1]) for key, item in items.items() if key != _BUNDLE)
        return Packed(items, payload, sizes, used, payload_bytes=payload)

    def decompress(self, packed: Packed):
        from ..floats import compute_dtype, narrow

        out = {}
        for name, item in packed.data.items():
            if name == _BUNDLE:
                compressed, data, members = item
                raw = memoryview(self._unzstd.decompress(data) if compressed else data)
                offset = 0
                for member, length, dtype, shape, np_dtype in members:
                    out[member] = _from_raw(raw[offset:offset + length], dtype, shape, np_dtype)
                    offset += length
            elif item[0] == "lossy":
                _, data, dtype, shape = item
                values = self.decode(data, compute_dtype(dtype), shape)
                out[name] = narrow(values.reshape(-1), dtype).reshape(shape)
            else:
                _, data, dtype, shape, np_dtype = item
                out[name] = _from_raw(self._unzstd.decompress(data), dtype, shape, np_dtype)
        return {name: out[name] for name in packed.tensor_bytes}  # the round's order

    def snapshot(self):
        return self.round

    def restore(self, snapshot) -> None:
        self.round = snapshot


_BUNDLE = "\0bundle"  # key of the small-tensor bundle in a per-tensor session's round (not a tensor name)


def _from_raw(raw, dtype: str, shape, np_dtype) -> np.ndarray:
    """A tensor read off its stored bytes: a view where they are already native (as gradzip's
    decoder returns read-only arrays; a copy per tensor was charged to the baselines)."""
    if dtype == "BF16":
        from ..tensorio import as_bfloat16

        return as_bfloat16(np.frombuffer(raw, "<u2")).reshape(shape)
    le = np_dtype.newbyteorder("<") if np_dtype.itemsize > 1 else np_dtype
    return np.frombuffer(raw, le).astype(np_dtype, copy=False).reshape(shape)


def _le_bytes(array: np.ndarray) -> np.ndarray:
    """A tensor's flat values, little-endian (a view where they already are)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.astype(flat.dtype.newbyteorder("<"), copy=False)


def at_most_4d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """SZ3 and ZFP take 1 to 4 dimensions: merge leading ones beyond four; scalars become (1,)."""
    if not shape:
        return (1,)
    shape = tuple(shape)
    while len(shape) > 4:
        shape = (shape[0] * shape[1],) + shape[2:]
    return shape


class SZ3Session(PerTensorSession):
    """SZ3 through pysz, ABS mode at the tensor's absolute bound."""

    def __init__(self, lossy_limit, seed, mode, error_bound, *, flatten: bool = False, nopred: bool = False):
        super().__init__(lossy_limit, seed, mode, error_bound)
        self.flatten = flatten
        self.nopred = nopred

    def _shape(self, shape):
        return (int(np.prod(shape, dtype=np.int64)),) if self.flatten else at_most_4d(shape)

    def encode(self, values, eb, index):
        return sz3_compress(values.reshape(self._shape(values.shape)), eb, nopred=self.nopred)

    def decode(self, data, dtype, shape):
        return sz3_decompress(data, dtype, self._shape(shape))


@functools.lru_cache(maxsize=1)
def _pysz():
    """pysz's names, imported once: an import statement per tensor cost SZ3 a few percent of
    a small model's round."""
    from pysz import sz, szAlgorithm, szConfig, szErrorBoundMode

    return sz, szAlgorithm, szConfig, szErrorBoundMode


def sz3_compress(values: np.ndarray, eb: float, *, nopred: bool = False) -> bytes:
    """pysz.sz.compress at ABS eb, default algorithm unless nopred (what SZ3 itself gives)."""
    sz, szAlgorithm, szConfig, szErrorBoundMode = _pysz()
    conf = szConfig(values.shape)
    conf.errorBoundMode = szErrorBoundMode.ABS
    conf.absErrorBound = eb
    if nopred:
        conf.cmprAlgo = szAlgorithm.NOPRED
    compressed, _ratio = sz.compress(values, conf)
    return compressed.tobytes()  # pysz returns a view of its worst-case-sized buffer


def sz3_decompress(data: bytes, dtype, shape) -> np.ndarray:
    values, _conf = _pysz()[0].decompress(np.frombuffer(data, np.uint8), dtype, shape)
    return values


class ZFPSession(PerTensorSession):
    """ZFP fixed-accuracy mode through zfpy, tolerance = the tensor's absolute bound."""

    def encode(self, values, eb, index):
        import zfpy

        return zfpy.compress_numpy(values.reshape(at_most_4d(values.shape)), tolerance=eb)

    def decode(self, data, dtype, shape):
        import zfpy

        return zfpy.decompress_numpy(data).astype(dtype, copy=False)


class QSGDSession(PerTensorSession):
    """QSGD: s levels of the max-norm with stochastic rounding; signed levels rANS-coded.

    Not error-bounded: the bound is ignored (it only decides, like for every method, which
    tensors are coded lossy). Payload: float64 scale, then gradzip's rANS coder over the signed
    levels in one context. Rounding noise is seeded per (seed, round, tensor), so runs repeat.
    """

    levels = QSGD_LEVELS
    derives_bounds = False  # (a bound only decides which tensors are coded lossy)

    def encode(self, values, eb, index):
        from ..entropy import rans

        flat = values.reshape(-1)
        finite = np.isfinite(flat)
        magnitudes = np.abs(np.where(finite, flat, 0))
        scale = float(magnitudes.max()) if flat.size else 0.0
        if scale > 0:
            rng = np.random.default_rng([self.seed, self.round, index])
            noise = rng.random(flat.size, dtype=np.float32 if flat.dtype == np.float32 else np.float64)
            level = np.floor(magnitudes * (self.levels / scale) + noise)
            np.minimum(level, self.levels, out=level)
            codes = np.where(flat < 0, -level, level).astype(np.int32)
        else:
            codes = np.zeros(flat.size, np.int32)
        coded = rans.encode(codes, np.zeros(flat.size, np.uint8), 1)
        return struct.pack("<d", scale) + coded

    def decode(self, data, dtype, shape):
        from ..entropy import rans

        (scale,) = struct.unpack_from("<d", data, 0)
        n = int(np.prod(shape, dtype=np.int64))
        codes = rans.decode_one_context(memoryview(data)[8:], n)
        return (codes * (scale / self.levels)).astype(dtype).reshape(shape)


class ZstdSession(PerTensorSession):
    """zstd on every tensor's raw little-endian bytes (lossless)."""

    lossy = False


def _per_tensor(cls, **kwargs):
    def make(mode, error_bound, lossy_limit, seed):
        return cls(lossy_limit, seed, mode, error_bound, **kwargs)
    return make


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("gradzip", "gradzip", "gradzip", True,
           "gradzip as shipped (every predictor and coder it has, smallest kept per tensor), one thread like SZ3",
           (), _gradzip(True, True)),
    Method("gradzip-mt", "gradzip all threads", "gradzip", True,
           "gradzip as shipped on every core: tensors, rANS segments and a large layer's two low-rank fits on "
           "gradzip's threads, numpy's BLAS on one (the other gradzip rows use one thread); same bytes",
           (), _gradzip(True, True, threads=None)),
    Method("gradzip-nopred", "gradzip no prediction", "gradzip", True, "ablation: every cross-round prediction off (the EMA magnitude and sign predictors and the linear one); this round's own scale contexts and low-rank parts stay",
           (), _gradzip(False, False)),
    Method("gradzip-mag", "gradzip magnitude only", "gradzip", True, "ablation: cross-round magnitude predictor only (sign predictor and the linear prediction, which needs both, off)",
           (), _gradzip(True, False)),
    Method("gradzip-sign", "gradzip sign only", "gradzip", True, "ablation: sign predictor only (magnitude predictor and the linear prediction, which needs both, off)",
           (), _gradzip(False, True)),
    Method("sz3", "SZ3", "sz3", True, "SZ3 (pysz), default algorithm, the tensor's own shape (leading dims merged beyond 4-D)",
           ("pysz",), _per_tensor(SZ3Session)),
    Method("sz3-1d", "SZ3 1-D", "sz3", True, "SZ3 (pysz), default algorithm, tensor flattened to 1-D (as APPFL calls it)",
           ("pysz",), _per_tensor(SZ3Session, flatten=True)),
    Method("sz3-nopred", "SZ3 NOPRED", "sz3", True, "SZ3 (pysz), NOPRED algorithm (quantization + SZ3's entropy coding only)",
           ("pysz",), _per_tensor(SZ3Session, nopred=True)),
    Method("zfp", "ZFP", "zfp", True, "ZFP (zfpy), fixed-accuracy mode, tolerance = eb",
           ("zfpy",), _per_tensor(ZFPSession)),
    Method("qsgd", f"QSGD s={QSGD_LEVELS}", "qsgd", False,
           f"QSGD, s={QSGD_LEVELS} levels of the max-norm, stochastic rounding, levels rANS-coded; NOT error-bounded",
           (), _per_tensor(QSGDSession)),
    Method("zstd", "zstd (lossless)", "lossless", True, "zstd (gradzip's level) on the raw bytes: a frame per large tensor, the small ones in one frame",
           ("zstandard",), _per_tensor(ZstdSession)),
]}

DEFAULT_METHODS = tuple(METHODS)


def resolve(names) -> list[Method]:
    """Methods by name, in the order given (None: all); unknown names raise ValueError."""
    if not names:
        return list(METHODS.values())
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return [METHODS[n] for n in dict.fromkeys(names)]
