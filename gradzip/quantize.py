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
def _reconstruct(p, two_eb, q):
    return p + two_eb * q


@numba.njit(cache=True, nogil=True, inline="always")
def _shift_at(ema, mean, std, signs, scale, i):
    # The prediction: 0 where ema is empty, else the EMA shift sign x |M std + mean| (x scale),
    # element by element in float64, in the order docs/format.md gives, so both sides compute
    # it alike and no prediction buffer is needed.
    if ema.size == 0:
        return 0.0
    p = abs(np.float64(ema[i]) * std + mean) * np.float64(signs[i])
    return p * scale if scale != 1.0 else p


@numba.njit(cache=True, nogil=True, inline="always")
def _code_and_recon(x, p, eb, two_eb, recon_type):
    """(code, reconstruction, True) for x against prediction p, or (0, 0, False) when x must
    be escaped."""
    scaled = (x - p) / two_eb
    negative_zero = x == 0.0 and math.copysign(1.0, x) < 0.0
    if math.isfinite(scaled) and abs(scaled) < RADIUS - 1 and not negative_zero:
        q = math.floor(scaled + 0.5)
        r = recon_type(_reconstruct(p, two_eb, q))
        if abs(x - np.float64(r)) <= eb:
            return np.int32(q), r, True
    return np.int32(0), recon_type(0.0), False


@numba.njit(cache=True, nogil=True)
def quantize(values, ema, mean, std, signs, scale, eb, codes, recon, escaped):
    """Fill codes, recon (values' dtype) and the escape mask; return the number escaped.

    values: float32/float64, 1-D. The prediction is 0 (ema empty) or the EMA shift (ema
    float32, signs int8, scale 1 for none). recon may be empty: the bound is checked all the
    same, and dequantize rebuilds the same values later.
    """
    two_eb = 2.0 * eb
    n_escaped = 0
    keep = recon.size > 0
    for i in range(values.size):
        q, r, ok = _code_and_recon(np.float64(values[i]), _shift_at(ema, mean, std, signs, scale, i), eb, two_eb,
                                   recon.dtype.type)
        codes[i] = q
        escaped[i] = not ok
        n_escaped += not ok
        if keep:
            recon[i] = r if ok else values[i]
    return n_escaped


@numba.njit(cache=True, nogil=True)
def dequantize(codes, ema, mean, std, signs, scale, eb, recon):
    """Rebuild x' = p + 2 eb q into recon (any float dtype), p as in quantize; escaped slots
    are overwritten later."""
    two_eb = 2.0 * eb
    for i in range(codes.size):
        recon[i] = recon.dtype.type(_reconstruct(_shift_at(ema, mean, std, signs, scale, i), two_eb, np.float64(codes[i])))


@numba.njit(cache=True, nogil=True)
def shift_fit_sums(values, ema, mean, std, signs):
    """(sum p x, sum p^2) of the unscaled EMA shift p over the finite elements: the least-
    squares scale of the shift is their ratio (encoder only)."""
    cross = 0.0
    square = 0.0
    for i in range(values.size):
        p = _shift_at(ema, mean, std, signs, 1.0, i)
        x = np.float64(values[i])
        if math.isfinite(x):
            cross += p * x
        square += p * p
    return cross, square


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
