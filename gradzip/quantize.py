"""Linear quantization of prediction residuals with a guaranteed pointwise bound.

q = round((x - p) / (2 eb)), x' = p + 2 eb q. An element is *escaped* (stored exactly) when
|q| would reach RADIUS, when x or the residual is not finite, when x is -0.0 (so signed zeros
survive), or when x', after the cast back to the tensor's dtype, is further than eb from x. Encoder and decoder both reconstruct with
`_reconstruct`, so they agree bit for bit (no fastmath anywhere here).
"""
from __future__ import annotations

import math

import numba
import numpy as np

# Codes live in (-RADIUS, RADIUS); larger residuals are escaped. 2**15 as in SZ3.
RADIUS = 1 << 15


@numba.njit(cache=True, nogil=True, inline="always")
def _prediction_at(prediction, i):
    # An empty prediction array means "predict zero" and saves an n-element buffer.
    return prediction[i] if prediction.size else 0.0


@numba.njit(cache=True, nogil=True, inline="always")
def _reconstruct(p, two_eb, q):
    return p + two_eb * q


@numba.njit(cache=True, nogil=True)
def quantize(values, prediction, eb, codes, recon, escaped):
    """Fill codes, recon (values' dtype) and the escape mask; return the number escaped.

    values: float32/float64, 1-D. prediction: float64, 1-D, or empty for zero. recon may be
    empty: the bound is checked all the same, and dequantize rebuilds the same values later.
    """
    two_eb = 2.0 * eb
    n_escaped = 0
    for i in range(values.size):
        x = np.float64(values[i])
        p = _prediction_at(prediction, i)
        scaled = (x - p) / two_eb
        negative_zero = x == 0.0 and math.copysign(1.0, x) < 0.0
        if math.isfinite(scaled) and abs(scaled) < RADIUS - 1 and not negative_zero:
            q = math.floor(scaled + 0.5)
            r = recon.dtype.type(_reconstruct(p, two_eb, q))
            if abs(x - np.float64(r)) <= eb:
                codes[i] = np.int32(q)
                if recon.size:
                    recon[i] = r
                escaped[i] = False
                continue
        codes[i] = 0
        if recon.size:
            recon[i] = values[i]
        escaped[i] = True
        n_escaped += 1
    return n_escaped


@numba.njit(cache=True, nogil=True)
def dequantize(codes, prediction, eb, recon):
    """Rebuild x' = p + 2 eb q into recon (any float dtype); escaped slots are overwritten later."""
    two_eb = 2.0 * eb
    for i in range(codes.size):
        recon[i] = recon.dtype.type(_reconstruct(_prediction_at(prediction, i), two_eb, np.float64(codes[i])))


@numba.njit(cache=True, nogil=True)
def finite_range(values):
    """(count, min, max) of the finite elements, in one pass (rel mode's value range)."""
    count = 0
    lo = math.inf
    hi = -math.inf
    for i in range(values.size):
        v = np.float64(values[i])
        if math.isfinite(v):
            count += 1
            lo = min(lo, v)
            hi = max(hi, v)
    return count, lo, hi
