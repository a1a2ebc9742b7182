"""Error figures of a reconstruction: max abs error, PSNR, NRMSE, and the bound check."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .floats import LOSSY_DTYPES, widen


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
    x = widen(original, dtype).astype(np.float64)
    y = widen(recon, dtype).astype(np.float64)
    finite = np.isfinite(x)
    # NaN, +Inf and -Inf must come back as themselves.
    nonfinite_exact = bool(np.array_equal(x[~finite], y[~finite], equal_nan=True))
    if not finite.any():
        return ErrorFigures(0.0, 0.0, 0, 0.0, nonfinite_exact)
    xf, yf = x[finite], y[finite]
    with np.errstate(over="ignore", invalid="ignore"):
        error = np.abs(xf - yf)
        sse = float(np.dot(error, error))
        value_range = float(xf.max() - xf.min())
    max_error = float(error.max()) if error.size else 0.0
    within = nonfinite_exact and bool(np.all(error <= eb)) and not np.isnan(max_error)
    return ErrorFigures(max_error, sse, int(finite.sum()), value_range, within)
