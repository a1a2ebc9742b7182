"""Runs every method over one client's rounds at every error bound, and measures it.

Same tensors, same bound: for each bound and round the runner computes every tensor's
absolute bound once, with gradzip's own `absolute_bound` (rel: eb * max - eb * min over the
finite values, i.e. eb times the value range up to one rounding, as in SZ3's REL mode; abs:
eb), and hands that dict to every method (an error-bounded baseline computes it again inside
its timed call, as gradzip computes its own: methods.py). gradzip runs one Compressor per method across all
rounds in the same mode (its state must span rounds), and the runner checks that the bound
gradzip reports for every quantized tensor is bit-identical to the runner's; every baseline
reports the bound it coded each tensor under. Any difference raises BenchError: methods are
never compared at different bounds.

Figures per method and bound (JSON-ready dict, see `run_bench`):
- sizes: compressed bytes, ratio and bits per value, total and per round;
- speed: compress and decompress MB/s (10**6 bytes of original data per second), the minimum
  over `repeats` runs of each round, the methods' runs alternating (see `_run_methods`), after
  a warm-up on the first two rounds (and on any later round that brings a new dtype) with a
  throwaway session per method; the warm-up's extra
  time over the steady state (numba compilation or cache loading, imports, first-call set-up)
  is reported separately as `warmup_overhead_seconds`;
  the fastest process CPU times are kept too (steadier than wall time on a busy machine);
- errors: max abs error, max error / eb, PSNR (20 log10(range / RMSE), range the largest
  tensor value range, RMSE pooled over every float element, as `gradzip compress` reports),
  NRMSE, and the number of elements over the bound;
- memory: see `_PeakMemory`, measured per method in a process of its own, before the timed
  runs (`_memory_in_fresh_process`);
- gradzip: the coder's efficiency (rANS code bytes against the ideal code length under its
  own model, measured in an untimed re-encoding), predictors and coders chosen, framing
  (`framing_bytes`: .grz header and records; baselines are charged none) and state size.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import GradzipError
from .commtime import comm_time
from .methods import METHODS, Method, Packed, blas_one_thread, resolve

SCHEMA = "gradzip-bench/1"


class BenchError(GradzipError):
    """The benchmark cannot be run as asked, or a method broke its contract."""


@dataclass
class BenchConfig:
    error_bounds: tuple[float, ...] = (1e-3,)
    mode: str = "rel"
    methods: tuple[str, ...] | None = None  # None: every method
    bandwidths: tuple[float, ...] = (1e6, 1e7, 1e8)  # bit/s
    repeats: int = 3
    memory: bool = True
    seed: int = 0
    lossy_limit: int | None = None  # None: gradzip's MIN_LOSSY_ELEMENTS


@dataclass
class Round:
    label: str
    tensors: dict[str, np.ndarray]

    @property
    def original_bytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    @property
    def elements(self) -> int:
        return sum(a.size for a in self.tensors.values())


def load_rounds(paths) -> list[Round]:
    """Read tensor files (safetensors, .npy, .npz), one round each, in the order given."""
    from ..tensorio import read_tensors

    rounds = []
    for path in paths:
        data = Path(path).read_bytes()
        tensors, _fmt, _meta = read_tensors(data, str(path))
        rounds.append(Round(str(path), tensors))
    return rounds


def tensor_bounds(tensors: dict[str, np.ndarray], mode: str, error_bound: float) -> dict[str, float]:
    """The absolute bound of every float tensor of a round (what gradzip itself would use)."""
    from ..codec import CodecConfig, absolute_bound
    from ..floats import LOSSY_DTYPES, widen
    from ..tensorio import dtype_name

    config = CodecConfig(error_bound=error_bound, mode=mode)
    bounds = {}
    for name, array in tensors.items():
        dtype = dtype_name(array)
        bounds[name] = absolute_bound(widen(array, dtype), config) if dtype in LOSSY_DTYPES and array.size else 0.0
    return bounds


# ---------------------------------------------------------------- measurement helpers


@dataclass
class _Errors:
    max_abs_error: float = 0.0
    max_error_over_eb: float = 0.0
    sse: float = 0.0
    count: int = 0
    value_range: float = 0.0
    over_bound: int = 0

    def add(self, other: "_Errors") -> None:
        self.max_abs_error = max(self.max_abs_error, other.max_abs_error)
        self.max_error_over_eb = max(self.max_error_over_eb, other.max_error_over_eb)
        self.sse += other.sse
        self.count += other.count
        self.value_range = max(self.value_range, other.value_range)
        self.over_bound += other.over_bound

    @property
    def psnr(self) -> float:
        from ..metrics import psnr

        return psnr(self.value_range, self.sse / self.count if self.count else 0.0)

    @property
    def nrmse(self) -> float:
        return math.sqrt(self.sse / self.count) / self.value_range if self.count and self.value_range else 0.0


def compare(original: np.ndarray, recon: np.ndarray, eb: float) -> _Errors:
    """Errors of one reconstructed tensor against the bound eb (non-finite values must match bit for bit)."""
    from ..floats import LOSSY_DTYPES, widen
    from ..metrics import count_exceeding
    from ..tensorio import dtype_name

    dtype = dtype_name(original)
    if recon.shape != original.shape:
        raise BenchError(f"reconstruction has shape {recon.shape}, expected {original.shape}")
    if recon.dtype != original.dtype:  # (a float32 result for an F64 input, 2.7 for an int 2: not the tensor)
        raise BenchError(f"reconstruction has dtype {recon.dtype}, expected {original.dtype}")
    if dtype not in LOSSY_DTYPES:
        a = np.ascontiguousarray(original).reshape(-1)
        b = np.ascontiguousarray(recon).reshape(-1)
        wrong = int(np.count_nonzero(a != b))
        return _Errors(max_abs_error=math.inf if wrong else 0.0, over_bound=wrong)
    x = widen(original, dtype).astype(np.float64)
    y = widen(recon, dtype_name(recon) if dtype_name(recon) in LOSSY_DTYPES else dtype).astype(np.float64)
    finite = np.isfinite(x)
    nonfinite_wrong = 0
    if not finite.all():
        xb, yb = x[~finite], y[~finite]
        nonfinite_wrong = int(np.count_nonzero(~((xb == yb) | (np.isnan(xb) & np.isnan(yb)))))
        x, y = x[finite], y[finite]
    with np.errstate(over="ignore", invalid="ignore"):
        error = np.abs(x - y)
    error[np.isnan(error)] = np.inf
    max_error = float(error.max()) if error.size else 0.0
    value_range = float(x.max() - x.min()) if x.size else 0.0
    return _Errors(max_abs_error=max_error, max_error_over_eb=(max_error / eb) if eb > 0 else (math.inf if max_error else 0.0),
                   sse=float(np.dot(error, error)) if np.isfinite(max_error) else math.inf, count=int(x.size),
                   value_range=value_range, over_bound=int(count_exceeding(x, y, eb)) + nonfinite_wrong)


class _PeakMemory:
    """Peak extra resident memory of a block: Linux VmHWM after resetting it (clear_refs 5).

    This catches every allocation (numpy, numba's runtime, SZ3's and ZFP's C/C++ heaps), page
    by page, relative to the resident size when the block starts (inputs already loaded are not
    counted; outputs are). Freed heap is handed back first (malloc_trim) so reused pages count.
    Where that is unavailable (not Linux, or no permission), `available` is False and the
    runner falls back to tracemalloc, which sees numpy and Python allocations only.
    """

    def __init__(self):
        self.available = False
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._reset()
            self.available = self._status("VmHWM") is not None
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int | None:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return None

    def start(self) -> None:
        self._libc.malloc_trim(0)  # (no gc.collect: arrays are freed by reference counting, and it costs ~0.1 s)
        self._reset()
        self._start = self._status("VmRSS")

    def peak(self) -> int:
        return max(0, self._status("VmHWM") - self._start)


class _TracedMemory:
    """Fallback: tracemalloc's peak (numpy and Python allocations; not C/C++ or numba internals)."""

    available = True

    def start(self) -> None:
        import tracemalloc

        gc.collect()
        if tracemalloc.is_tracing():
            tracemalloc.stop()
        tracemalloc.start()

    def peak(self) -> int:
        import tracemalloc

        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak


def _memory_probe():
    probe = _PeakMemory()
    if probe.available:
        return probe, "rss"
    return _TracedMemory(), "tracemalloc"


_MEMORY_WARMUP_ROUNDS = 4  # a search with two rounds of history and a reusing round: every kernel loaded


def _memory_in_fresh_process(method: Method, job_path: str, probe: str, error_bound: float) -> int:
    """Peak memory of `method` at one bound (see measure_memory_here), measured in a new
    Python process that runs that method at that bound alone, as a client does: in the
    bench's own process the probe read the heap that other calls had left (gradzip on
    cnn5fc 20.0-35.6 MiB there, 19.0-24.0 alone; on a small transformer 3.9 MiB, 1.5-2.2)."""
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    package_root = str(Path(__file__).resolve().parents[2])  # the child imports this gradzip, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "gradzip.bench.memory_child", job_path, method.name, probe,
                           repr(error_bound)], capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no error output"])[-1]
        raise BenchError(f"method {method.name!r}: the memory pass failed in its own process: {last}")
    return int(lines[-1])


def measure_memory_here(job_path: str, method_name: str, probe_name: str, error_bound: str) -> int:
    """The memory pass at one bound, in the process that calls it (the bench starts a fresh
    one per method and bound): a warm-up session over the first rounds (compiled kernels and
    caches load once, as in a process that has run a round before), then a new session whose
    every compress call, round after round, and then every decompress call is measured, as
    a client compresses and a server decompresses. Returns the largest peak, in bytes."""
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    method = resolve((method_name,))[0]
    memory = _PeakMemory() if probe_name == "rss" else _TracedMemory()
    eb = float(error_bound)
    rounds = job["rounds"]
    bounds = [tensor_bounds(r.tensors, job["mode"], eb) for r in rounds]
    with blas_one_thread():
        warm = method.make(job["mode"], eb, job["lossy_limit"], job["seed"])
        for r, b in zip(rounds[:_MEMORY_WARMUP_ROUNDS], bounds):
            warm.decompress(warm.compress(r.tensors, b))
        del warm
        session = method.make(job["mode"], eb, job["lossy_limit"], job["seed"])
        packed, peak = [], 0
        for r, b in zip(rounds, bounds):
            memory.start()
            packed.append(session.compress(r.tensors, b))
            peak = max(peak, memory.peak())
        for p in packed:
            memory.start()
            session.decompress(p)
            peak = max(peak, memory.peak())
    return peak


# ---------------------------------------------------------------- one method at one bound


@dataclass
class _RoundFigures:
    compressed_bytes: int = 0
    compress_seconds: float = 0.0
    decompress_seconds: float = 0.0
    compress_cpu: float = 0.0
    decompress_cpu: float = 0.0
    errors: _Errors = field(default_factory=_Errors)


def _warmups(rounds: list[Round], bounds: list[dict[str, float]]) -> list[tuple[list, list]]:
    """(rounds, bounds) of each warm-up session: the first two rounds, then three copies of
    each later round with a dtype no round before it had."""
    def dtypes(r):
        return {str(a.dtype) for a in r.tensors.values()}

    warmups = [(rounds[:2], bounds[:2])]
    seen = set().union(*(dtypes(r) for r in rounds[:2]))
    for r, b in zip(rounds[2:], bounds[2:]):
        if not dtypes(r) <= seen:
            warmups.append(([r] * 3, [b] * 3))
            seen |= dtypes(r)
    return warmups


def _check_bounds(method: Method, packed: Packed, bounds: dict[str, float], round_label: str) -> None:
    for name, used in packed.used_bounds.items():
        if used != 0.0 and used != bounds.get(name):
            raise BenchError(f"{method.name} coded {name!r} of {round_label} under eb={used!r}, "
                             f"the bench's bound is {bounds.get(name)!r}: refusing to compare at different bounds")


class _MethodRun:
    """One method over the rounds at one bound: its session, and its figures round by round.
    run_bench drives every method's run through a round at once, so their timed calls can
    alternate (see _run_methods)."""

    def __init__(self, method: Method, mode: str, error_bound: float, config: BenchConfig, lossy_limit: int,
                 peak_memory: int | None, rounds: list[Round], bounds: list[dict[str, float]]):
        self.method, self.peak_memory = method, peak_memory

        def session():
            return method.make(mode, error_bound, lossy_limit, config.seed)

        self.session = session
        # Warm-up, at every bound (a new bound can reach code not compiled yet): a throwaway
        # session over the first two rounds (prediction needs a second round), and one over
        # three copies of each later round that brings a dtype the rounds before did not
        # (else the method timed first on it paid for loading or compiling its kernels).
        t0 = time.perf_counter()
        for warm_rounds, warm_bounds in _warmups(rounds, bounds):
            throwaway = session()
            for r, b in zip(warm_rounds, warm_bounds):
                throwaway.decompress(throwaway.compress(r.tensors, b))
            del throwaway
        self.warmup_seconds = time.perf_counter() - t0
        self.s = session()
        self.per_round: list[_RoundFigures] = []
        self.tensor_bytes: dict[str, list[int]] = {}
        self.described: list[dict] = []
        self.payload = 0

    def start_round(self, r: Round, b: dict[str, float]) -> None:
        """The round's state to restore before each timed compression."""
        self.round, self.bounds, self.figures = r, b, _RoundFigures()
        self.figures.compress_seconds = self.figures.compress_cpu = math.inf
        self.figures.decompress_seconds = self.figures.decompress_cpu = math.inf
        self.snap = self.s.snapshot()
        self.sizes: set[int] = set()

    def compress_once(self) -> None:
        self.s.restore(self.snap)
        c0, t0 = time.process_time(), time.perf_counter()
        packed = self.s.compress(self.round.tensors, self.bounds)
        self.figures.compress_seconds = min(self.figures.compress_seconds, time.perf_counter() - t0)
        self.figures.compress_cpu = min(self.figures.compress_cpu, time.process_time() - c0)
        self.sizes.add(packed.nbytes)
        self.packed = packed

    def compressed(self) -> None:
        """After the timed compressions: checks, and the state to restore before each timed
        decompression."""
        if len(self.sizes) != 1:
            raise BenchError(f"{self.method.name}: repeated compression of {self.round.label} gave different sizes "
                             f"{sorted(self.sizes)}")
        _check_bounds(self.method, self.packed, self.bounds, self.round.label)
        self.after_compress = self.s.snapshot()

    def decompress_once(self) -> None:
        self.s.restore(self.after_compress)
        c0, t0 = time.process_time(), time.perf_counter()
        self.recon = self.s.decompress(self.packed)
        self.figures.decompress_seconds = min(self.figures.decompress_seconds, time.perf_counter() - t0)
        self.figures.decompress_cpu = min(self.figures.decompress_cpu, time.process_time() - c0)

    def end_round(self) -> None:
        r, b, packed, recon, figures = self.round, self.bounds, self.packed, self.recon, self.figures
        figures.compressed_bytes = packed.nbytes
        if set(recon) != set(r.tensors):
            raise BenchError(f"{self.method.name}: decompressed tensors {sorted(recon)} differ from the input's")
        for name, original in r.tensors.items():
            figures.errors.add(compare(original, recon[name], b[name]))
            self.tensor_bytes.setdefault(name, []).append(packed.tensor_bytes.get(name, 0))
        self.described.append(self.s.describe(packed))
        self.payload += (packed.payload_bytes if packed.payload_bytes is not None
                         else self.described[-1].get("payload_bytes", packed.nbytes))
        del self.recon, self.packed
        self.per_round.append(figures)

    def result(self, rounds: list[Round], config: BenchConfig) -> dict:
        method, per_round = self.method, self.per_round
        original = sum(r.original_bytes for r in rounds)
        elements = sum(r.elements for r in rounds)
        compressed = sum(f.compressed_bytes for f in per_round)
        c_seconds = sum(f.compress_seconds for f in per_round)
        d_seconds = sum(f.decompress_seconds for f in per_round)
        errors = _Errors()
        for f in per_round:
            errors.add(f.errors)
        result = {
            "method": method.name, "label": method.label, "family": method.family, "error_bounded": method.error_bounded,
            "original_bytes": original, "compressed_bytes": compressed,
            "ratio": original / compressed if compressed else None,
            # the tensors' own payloads, without the method's framing (gradzip: .grz header and records)
            "payload_bytes": self.payload, "framing_bytes": compressed - self.payload,
            "bits_per_value": 8 * compressed / elements if elements else 0.0,
            "compress_seconds": c_seconds, "decompress_seconds": d_seconds,
            "compress_mb_s": original / c_seconds / 1e6 if c_seconds else None,
            "decompress_mb_s": original / d_seconds / 1e6 if d_seconds else None,
            # process CPU time (all threads): a steadier figure than wall time on a busy machine
            "compress_cpu_seconds": sum(f.compress_cpu for f in per_round),
            "decompress_cpu_seconds": sum(f.decompress_cpu for f in per_round),
            "warmup_seconds": self.warmup_seconds,
            "warmup_overhead_seconds": max(0.0, self.warmup_seconds
                                           - sum(f.compress_seconds + f.decompress_seconds for f in per_round[:2])),
            "max_abs_error": _num(errors.max_abs_error), "max_error_over_eb": _num(errors.max_error_over_eb),
            "psnr": _num(errors.psnr), "nrmse": _num(errors.nrmse), "over_bound": errors.over_bound,
            "peak_memory_bytes": self.peak_memory,
            "rounds": [{"round": i, "input": r.label, "original_bytes": r.original_bytes,
                        "compressed_bytes": f.compressed_bytes,
                        "ratio": r.original_bytes / f.compressed_bytes if f.compressed_bytes else None,
                        "bits_per_value": 8 * f.compressed_bytes / r.elements if r.elements else 0.0,
                        "compress_seconds": f.compress_seconds, "decompress_seconds": f.decompress_seconds,
                        "max_abs_error": _num(f.errors.max_abs_error), "psnr": _num(f.errors.psnr),
                        "over_bound": f.errors.over_bound}
                       for i, (r, f) in enumerate(zip(rounds, per_round))],
            "tensor_bytes": self.tensor_bytes,
            "comm_time": [comm_time(compress_seconds=c_seconds, decompress_seconds=d_seconds, compressed_bytes=compressed,
                                    original_bytes=original, rounds=len(rounds), bandwidth=bw)
                          for bw in config.bandwidths],
        }
        if method.family == "gradzip":
            result["gradzip"] = _gradzip_figures(self.described, self.s)
        return result


def _run_methods(methods: list[Method], rounds: list[Round], bounds: list[dict[str, float]], mode: str,
                 error_bound: float, config: BenchConfig, lossy_limit: int, peaks: dict[str, int], say) -> dict[str, dict]:
    """Every method over the rounds at one bound. Round by round, the timed calls of all the
    methods alternate (each method's first compression, then each one's second, ...), so a
    spell of a slow machine (this one's speed drifts by up to 2x within an hour) falls on all
    of them alike instead of on whichever method ran then: their speed ratios are what it
    measures best."""
    runs = []
    for method in methods:
        say(f"{mode} {error_bound:g}: {method.label} (warm-up)")
        runs.append(_MethodRun(method, mode, error_bound, config, lossy_limit, peaks.get(method.name), rounds, bounds))
    for i, (r, b) in enumerate(zip(rounds, bounds)):
        say(f"{mode} {error_bound:g}: round {i + 1} of {len(rounds)}, {len(runs)} methods alternating")
        for run in runs:
            run.start_round(r, b)
        for _ in range(config.repeats):
            for run in runs:
                run.compress_once()
        for run in runs:
            run.compressed()
        for _ in range(config.repeats):
            for run in runs:
                run.decompress_once()
        for run in runs:
            run.end_round()
    return {run.method.name: run.result(rounds, config) for run in runs}


def _gradzip_figures(described: list[dict], session) -> dict:
    code_bytes = sum(d["rans_code_bytes"] for d in described)
    ideal_bits = sum(d["rans_ideal_code_bits"] for d in described)
    predictors: dict[str, int] = {}
    coders: dict[str, int] = {}
    for d in described:
        for k, v in d["predictors"].items():
            predictors[k] = predictors.get(k, 0) + v
        for k, v in d["coders"].items():
            coders[k] = coders.get(k, 0) + v
    state = session.compressor.state
    return {"rans_code_bytes": code_bytes, "rans_ideal_code_bytes": ideal_bits / 8,
            "coder_overhead": (8 * code_bytes / ideal_bits - 1) if ideal_bits else None,
            "predictors": predictors, "coders": coders,
            "container_bytes": sum(d["container_bytes"] for d in described),
            "escaped": sum(d["escaped"] for d in described),
            "state_bytes": sum(t.ema.nbytes + t.sign.nbytes + t.last.nbytes + t.second_last.nbytes
                               for t in state.tensors.values())}


def _num(value):
    """JSON has no inf/NaN: None stands for 'exact' (inf PSNR) or 'undefined'."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------- the whole bench


def environment() -> dict:
    import numba

    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    for module in ("pysz", "zfpy", "zstandard"):
        try:
            from importlib.metadata import version

            versions[module] = version(module)
        except Exception:  # noqa: BLE001 - not installed or no metadata
            versions[module] = None
    from .. import __version__

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"gradzip": __version__, **_source_revision(), "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": versions, "platform": platform.platform(), "load_average": load,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS}


def _source_revision() -> dict:
    """The git commit of the code that ran, and whether its tree had changes (None outside a
    checkout): so a committed result can be traced to its code."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "gradzip"], cwd=root,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    if commit.returncode or status.returncode:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def run_bench(rounds: list[Round], config: BenchConfig, *, progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark every requested method on `rounds` (one client's, in order); returns a JSON-ready dict."""
    from ..codec import MIN_LOSSY_ELEMENTS, CodecConfig

    if not rounds:
        raise BenchError("no rounds to benchmark")
    if config.mode not in ("rel", "abs"):
        raise BenchError(f"mode must be rel or abs, not {config.mode!r}")
    if not config.error_bounds:
        raise BenchError("give at least one error bound")
    for eb in config.error_bounds:
        CodecConfig(error_bound=eb, mode=config.mode)  # same validation as gradzip compress
        if not eb > 0:
            raise BenchError(f"the error bound must be positive, not {eb!r}")
    if config.repeats < 1:
        raise BenchError("repeats must be at least 1")
    try:
        methods = resolve(config.methods)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    lossy_limit = MIN_LOSSY_ELEMENTS if config.lossy_limit is None else config.lossy_limit
    say = progress or (lambda _msg: None)

    runnable, skipped = [], []
    for method in methods:
        reason = method.missing()
        if reason:
            skipped.append({"method": method.name, "reason": reason})
        else:
            runnable.append(method)
    memory_method = _memory_probe()[1] if config.memory else None

    names = list(dict.fromkeys(n for r in rounds for n in r.tensors))
    largest = max(a.nbytes for r in rounds for a in r.tensors.values())
    out = {
        "schema": SCHEMA,
        "environment": environment(),
        "inputs": [r.label for r in rounds],
        "mode": config.mode,
        "error_bounds": list(config.error_bounds),
        "bandwidths_bit_per_s": list(config.bandwidths),
        "settings": {"repeats": config.repeats, "seed": config.seed, "lossy_limit": lossy_limit,
                     "memory": memory_method,
                     "timing": "min over repeats per round, the methods alternating, single process, after a warm-up on the first two rounds",
                     "mb": "10**6 bytes of original data"},
        "data": {"rounds": len(rounds), "tensors": len(names), "original_bytes": sum(r.original_bytes for r in rounds),
                 "elements": sum(r.elements for r in rounds), "largest_tensor_bytes": largest,
                 "round_original_bytes": [r.original_bytes for r in rounds]},
        "methods": [{"method": m.name, "label": m.label, "family": m.family, "error_bounded": m.error_bounded,
                     "description": m.description} for m in runnable],
        "skipped": skipped,
        "results": [],
    }
    peaks: dict[float, dict[str, int]] = {eb: {} for eb in config.error_bounds}
    if memory_method is not None:  # before the timed runs, which it must not overlap
        with tempfile.TemporaryDirectory(prefix="gradzip-bench-") as tmp:
            job_path = os.path.join(tmp, "job.pickle")
            with open(job_path, "wb") as f:
                pickle.dump({"rounds": rounds, "mode": config.mode, "lossy_limit": lossy_limit, "seed": config.seed}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            for eb in config.error_bounds:
                for method in runnable:
                    say(f"{config.mode} {eb:g}: {method.label} (memory, in a process of its own)")
                    peaks[eb][method.name] = _memory_in_fresh_process(method, job_path, memory_method, eb)
    with blas_one_thread():
        for eb in config.error_bounds:
            bounds = [tensor_bounds(r.tensors, config.mode, eb) for r in rounds]
            entry = {"error_bound": eb, "bounds": {n: [b.get(n) for b in bounds] for n in names}, "methods": {}}
            entry["methods"] = _run_methods(runnable, rounds, bounds, config.mode, eb, config, lossy_limit, peaks[eb], say)
            _relative_to(entry["methods"], "sz3")
            out["results"].append(entry)
    try:
        out["environment"]["load_average_after"] = list(os.getloadavg())
    except OSError:
        pass
    return out


def _relative_to(results: dict, reference: str) -> None:
    """ratio_vs_<ref>: compression ratio over the reference's (>1: smaller); payload_ratio_vs_<ref>: the same
    without framing."""
    ref = results.get(reference)
    for r in results.values():
        r["ratio_vs_" + reference] = (r["ratio"] / ref["ratio"]) if ref and ref["ratio"] and r["ratio"] else None
        r["payload_ratio_vs_" + reference] = (ref["payload_bytes"] / r["payload_bytes"]
                                              if ref and r["payload_bytes"] and ref["payload_bytes"] else None)


def json_text(result: dict) -> str:
    """The bench's figures as JSON text (what write_json writes), ending in a newline."""
    import json
    import re

    text = json.dumps(result, indent=1, allow_nan=False)
    # one line per list of numbers (per-round and per-tensor series), so the file stays readable
    return re.sub(r"\[\s+([-0-9.eE+,\s]*?|null[,\snul]*?)\s+\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def write_json(result: dict, path) -> None:
    """json_text to a file, replaced atomically (a reader never sees half of it)."""
    from ..state import atomic_write

    atomic_write(Path(path), json_text(result).encode())


__all__ = ["BenchConfig", "BenchError", "Round", "load_rounds", "tensor_bounds", "run_bench", "json_text", "write_json", "compare",
           "METHODS", "SCHEMA"]
