"""Error figures of a reconstruction: max abs error, PSNR, NRMSE, and the bound check."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from .floats import LOSSY_DTYPES, widen
from .quantize import exceeds


@dataclass
class ErrorFigures:
    max_abs_error: float
    sum_squared_error: float
    count: int  # finite elements compared
    value_range: float  # max - min of the finite originals
    within_bound: bool  # every finite element within eb, and every non-finite one bit-exact

    @property
    def rmse(self) -> float:
        return math.sqrt(self.sum_squared_error / self.count) if self.count else 0.0

    @property
    def psnr(self) -> float:
        return psnr(self.value_range, self.sum_squared_error / self.count if self.count else 0.0)

    @property
    def nrmse(self) -> float:
        return self.rmse / self.value_range if self.value_range else 0.0


def psnr(value_range: float, mse: float) -> float:
    """20 log10(range / RMSE); infinite for an exact reconstruction."""
    if mse == 0:
        return math.inf
    if value_range == 0 or not math.isfinite(value_range):
        return -math.inf
    return 20 * math.log10(value_range) - 10 * math.log10(mse)


def measure(original: np.ndarray, recon: np.ndarray, dtype: str, eb: float) -> ErrorFigures:
    """Compare a reconstruction with its original; non-float tensors must match exactly."""
    if original.shape != recon.shape:
        return ErrorFigures(math.inf, math.inf, 0, 0.0, False)
    if dtype not in LOSSY_DTYPES:
        exact = original.tobytes() == np.ascontiguousarray(recon).astype(original.dtype).tobytes()
        return ErrorFigures(0.0 if exact else math.inf, 0.0, 0, 0.0, exact)
    x = widen(original, dtype)
    y = widen(recon, dtype).astype(x.dtype, copy=False)
    bits = np.uint64 if x.itemsize == 8 else np.uint32
    max_error, sse, count, lo, hi, within = _compare(x, y, x.view(bits), y.view(bits), eb)
    value_range = hi - lo if count else 0.0
    return ErrorFigures(max_error if count else 0.0, sse, count, value_range, within)


@numba.njit(cache=True, nogil=True)
def count_exceeding(x, y, bound):
    """How many of x's elements are further than bound from y's, exactly (float64 arrays)."""
    count = 0
    for i in range(x.size):
        count += exceeds(x[i], y[i], bound)
    return count


@numba.njit(cache=True, nogil=True)
def _compare(x, y, x_bits, y_bits, eb):
    """One pass: max |x - y|, sum of squares, finite count, min, max, and the bound check."""
    max_error = 0.0
    sse = 0.0
    count = 0
    lo = math.inf
    hi = -math.inf
    within = True
    for i in range(x.size):
        a = np.float64(x[i])
        if not math.isfinite(a):
            # NaN (with its payload), +Inf and -Inf must come back as themselves.
            if x_bits[i] != y_bits[i]:
                within = False
            continue
        b = np.float64(y[i])
        error = abs(a - b)
        if exceeds(a, b, eb):
            within = False
        if error > max_error or error != error:
            max_error = error
        sse += error * error
        count += 1
        lo = min(lo, a)
        hi = max(hi, a)
    return max_error, sse, count, lo, hi, within
