"""Shared fixtures for gradzip's core, CLI, reliability, property and fuzz tests.

Helpers are handed out as (session-scoped) fixtures rather than imported, so that test files
do not depend on how pytest puts tests/ on sys.path.

The bound checker is deliberately independent of gradzip: it widens values itself (bfloat16
from its bit pattern), computes the per-tensor absolute bound itself, and compares in float64
(exactly, with fractions, where the float64 error lands on the bound).
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "sample_data"
MIN_SAMPLE_ROUNDS = 3
# A relative bound is eb * (max - min), itself a rounded float64 product. This slack covers
# only that rounding of the bound (a few ulp of the bound), never the reconstruction error.
REL_BOUND_SLACK = 1 + 2.0**-48
CLI_TIMEOUT = 300


# ----------------------------------------------------------------------------- sample data


@pytest.fixture(scope="session")
def sample_rounds() -> list[Path]:
    """The real gradient rounds in sample_data/, sorted; fails (never skips) if fewer than 3."""
    paths = sorted(SAMPLE_DIR.glob("round_*.safetensors"))
    if len(paths) < MIN_SAMPLE_ROUNDS:
        pytest.fail(f"sample_data is incomplete: {len(paths)} round_*.safetensors file(s) in {SAMPLE_DIR}, "
                    f"need at least {MIN_SAMPLE_ROUNDS}; regenerate them with `make sample-data`")
    return paths


# ----------------------------------------------------------------------------- values and bounds


def is_bf16(array: np.ndarray) -> bool:
    meta = array.dtype.metadata
    return bool(meta) and meta.get("gradzip_dtype") == "BF16"


def to_float64(array: np.ndarray) -> np.ndarray:
    """Flat float64 values of a float tensor; bfloat16 is decoded from its bit pattern."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if is_bf16(flat):
        return ((flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)).astype(np.float64)
    return flat.astype(np.float64)


def raw_bits(array: np.ndarray) -> np.ndarray:
    """Flat unsigned-integer view of each element's bits (native byte order)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    flat = flat.astype(flat.dtype.newbyteorder("="), copy=False) if not is_bf16(flat) else flat
    return flat.view(f"u{flat.dtype.itemsize}") if flat.dtype.kind != "b" else flat.view(np.uint8)


def dtype_label(array: np.ndarray) -> str:
    return "BF16" if is_bf16(array) else array.dtype.newbyteorder("=").name


def bfloat16_from_float32(values) -> np.ndarray:
    """bfloat16 tensor (uint16 bit patterns marked BF16) nearest to float32 values (NaN stays NaN)."""
    from gradzip.tensorio import as_bfloat16

    shape = np.shape(values)
    v = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    bits = v.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(v), ((bits >> 16) | 0x40).astype(np.uint16), rounded)
    return as_bfloat16(rounded).reshape(shape)


def absolute_bound(original: np.ndarray, eb: float, mode: str) -> float:
    """The per-tensor absolute bound: eb, or eb times the finite value range (max - min may overflow)."""
    if mode == "abs":
        return float(eb)
    x = to_float64(original)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return 0.0
    hi, lo = float(finite.max()), float(finite.min())
    span = hi - lo
    return eb * span if np.isfinite(span) else eb * hi - eb * lo


def assert_within_bound(original: np.ndarray, recon: np.ndarray, eb: float, mode: str, name: str = "tensor") -> None:
    """Every finite element within the bound in the original dtype; non-finite ones bit-exact."""
    assert recon.shape == original.shape, f"{name}: shape {recon.shape} != {original.shape}"
    assert dtype_label(recon) == dtype_label(original), f"{name}: dtype {dtype_label(recon)} != {dtype_label(original)}"
    x, y = to_float64(original), to_float64(recon)
    nonfinite = ~np.isfinite(x)
    if nonfinite.any():
        assert np.array_equal(raw_bits(original)[nonfinite], raw_bits(recon)[nonfinite]), \
            f"{name}: NaN/Inf elements are not reproduced bit for bit"
    assert np.isfinite(y[~nonfinite]).all(), f"{name}: a finite element came back non-finite"
    bound = absolute_bound(original, eb, mode)
    limit = bound * REL_BOUND_SLACK if mode == "rel" else bound
    with np.errstate(over="ignore"):
        error = np.abs(x[~nonfinite] - y[~nonfinite])
    bad = np.flatnonzero(~(error <= limit))
    assert bad.size == 0, (f"{name}: {bad.size} of {error.size} elements exceed the bound {bound!r} ({mode} {eb!r}); "
                           f"worst error {float(error.max())!r}")
    # x - y rounds where the two lie far apart in exponent: an error that lands exactly on the
    # limit is checked again in exact arithmetic.
    on_limit = np.flatnonzero(error == limit)
    finite_x, finite_y = x[~nonfinite], y[~nonfinite]
    over = [i for i in on_limit if abs(Fraction(float(finite_x[i])) - Fraction(float(finite_y[i]))) > Fraction(float(limit))]
    assert not over, f"{name}: {len(over)} elements exceed the bound {bound!r} in exact arithmetic (first at {over[0]})"


def assert_bit_exact(original: np.ndarray, recon: np.ndarray, name: str = "tensor") -> None:
    assert recon.shape == original.shape, f"{name}: shape {recon.shape} != {original.shape}"
    assert dtype_label(recon) == dtype_label(original), f"{name}: dtype {dtype_label(recon)} != {dtype_label(original)}"
    assert np.array_equal(raw_bits(original), raw_bits(recon)), f"{name}: not bit-exact"


def assert_same_layout(original: dict, decoded: dict) -> None:
    """Names (in order), dtypes and shapes survive exactly."""
    assert list(decoded) == list(original)
    for name in original:
        assert decoded[name].shape == original[name].shape, name
        assert dtype_label(decoded[name]) == dtype_label(original[name]), name


# ----------------------------------------------------------------------------- synthetic rounds


def make_rounds(n_rounds: int, seed: int = 0, scale: float = 1e-2) -> list[dict[str, np.ndarray]]:
    """Gradient-like rounds: correlated across rounds, sign-consistent conv kernels, mixed dtypes.

    Lossy tensors (> 1024 elements) and small/non-float ones (stored exactly) are both present.
    """
    rng = np.random.default_rng(seed)
    shapes = {"conv1.weight": (8, 4, 3, 3), "conv2.weight": (16, 12, 3, 3), "fc.weight": (40, 64), "fc.bias": (40,)}
    magnitude = {name: np.abs(rng.normal(size=shape)) for name, shape in shapes.items()}
    kernel_sign = {name: rng.choice([-1.0, 1.0], size=shape[:2] + (1, 1)) for name, shape in shapes.items() if len(shape) == 4}
    rounds = []
    for r in range(n_rounds):
        tensors: dict[str, np.ndarray] = {}
        for name, shape in shapes.items():
            magnitude[name] = 0.8 * magnitude[name] + 0.2 * np.abs(rng.normal(size=shape))
            sign = kernel_sign.get(name, 1.0) * np.where(rng.random(shape) < 0.85, 1.0, -1.0)
            if name not in kernel_sign:
                sign = np.where(rng.random(shape) < 0.5, 1.0, -1.0)
            tensors[name] = (scale * magnitude[name] * sign * (1 + 0.1 * r)).astype(np.float32)
        tensors["bn.running_var"] = (1 + 0.01 * rng.random(16)).astype(np.float32)
        tensors["bn.num_batches_tracked"] = np.array(100 * (r + 1), dtype=np.int64)
        tensors["embedding.index"] = rng.integers(0, 1000, size=2000).astype(np.int32)
        rounds.append(tensors)
    return rounds


# ----------------------------------------------------------------------------- CLI


def gradzip_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m gradzip.cli`."""
    script = Path(sys.executable).with_name("gradzip")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gradzip.cli"]


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: str


def run_gradzip(*args, cwd=None, input: bytes | None = None, stdin=None, stdout=None, env: dict | None = None,
                timeout: float = CLI_TIMEOUT) -> CliResult:
    """Run the gradzip CLI in a separate process; stdout is captured unless a file is given."""
    full_env = dict(os.environ)
    full_env.pop("COLUMNS", None)
    full_env.update(env or {})
    proc = subprocess.run(gradzip_command() + [str(a) for a in args], cwd=cwd, input=input,
                          stdin=stdin if input is None else None, stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE, env=full_env, timeout=timeout)
    return CliResult(proc.returncode, proc.stdout if stdout is None else b"", proc.stderr.decode("utf-8", "replace"))


def assert_cli_error(result: CliResult, *fragments: str) -> str:
    """A user error: non-zero exit, exactly one stderr line 'gradzip: error: ...', no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, f"expected failure, got exit 0; stderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {result.stderr!r}"
    assert lines[0].startswith("gradzip: error: "), lines[0]
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_cli_ok(result: CliResult) -> None:
    assert result.returncode == 0, f"exit {result.returncode}; stderr: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr


def write_safetensors(path, tensors: dict[str, np.ndarray]) -> Path:
    """Write plain-dtype tensors with the safetensors package itself (independent of gradzip)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return Path(path)


def tree_snapshot(directory) -> dict[str, bytes]:
    """Every file under directory (relative path -> bytes)."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def gz():
    """Helper namespace: bound checks, synthetic data and the CLI runner."""
    return SimpleNamespace(
        assert_within_bound=assert_within_bound, assert_bit_exact=assert_bit_exact,
        assert_same_layout=assert_same_layout, absolute_bound=absolute_bound, to_float64=to_float64,
        raw_bits=raw_bits, bfloat16_from_float32=bfloat16_from_float32, is_bf16=is_bf16,
        make_rounds=make_rounds, run=run_gradzip, assert_cli_error=assert_cli_error, assert_cli_ok=assert_cli_ok,
        write_safetensors=write_safetensors, tree_snapshot=tree_snapshot, command=gradzip_command,
    )
