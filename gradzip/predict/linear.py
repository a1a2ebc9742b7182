"""Linear predictor: this round's values from the last two rounds' reconstructions.

p = w_last * r[t-1] + w_second * r[t-2], element by element in float64, with the two weights
fitted by least squares per tensor and round and sent as side information, either one pair
for the whole tensor or one pair per row (axis 0: an output neuron or channel, whose updates
persist to their own degree). Where updates persist (an FC layer late in training) w_last
approaches 1; a negative w_second picks up updates that turn back. The reconstructions are kept in the state as float32, so both sides
predict from the same numbers whatever the tensor's dtype.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# Fitted weights beyond this are not sent (the fit is then degenerate, not informative).
MAX_LINEAR_WEIGHT = 4.0
# Per-row weights are sent as int16 in units of 2**-ROW_WEIGHT_FRACTION_BITS: far finer than
# any fit is accurate, and exact in float64 on both sides.
ROW_WEIGHT_FRACTION_BITS = 12
# Rows shorter than this do not get weights of their own (4 bytes of side information each).
MIN_ROW_ELEMENTS = 32


@numba.njit(cache=True, nogil=True, inline="always")
def linear_at(last, second_last, w_last, w_second, row, i):
    # w_last and w_second hold one weight per row (a single one for tensor-wide weights).
    return w_last[row] * np.float64(last[i]) + w_second[row] * np.float64(second_last[i])


@numba.njit(cache=True, nogil=True)
def linear_fit_sums(values, last, second_last, row_length, sums):
    """Per row of row_length elements, the normal equations' sums into sums[row] (5 float64):
    r1 r1, r1 r2, r2 r2, r1 x, r2 x, over the elements where all three are finite (encoder
    only). One row of values.size elements gives the tensor-wide sums."""
    for row in range(sums.shape[0]):
        s11 = s12 = s22 = s1x = s2x = 0.0
        for i in range(row * row_length, min(values.size, (row + 1) * row_length)):
            x = np.float64(values[i])
            a = np.float64(last[i])
            b = np.float64(second_last[i])
            if math.isfinite(x) and math.isfinite(a) and math.isfinite(b):
                s11 += a * a
                s12 += a * b
                s22 += b * b
                s1x += a * x
                s2x += b * x
        sums[row, 0] = s11
        sums[row, 1] = s12
        sums[row, 2] = s22
        sums[row, 3] = s1x
        sums[row, 4] = s2x


def fitted_row_weights(sums: np.ndarray, two_rounds: bool) -> np.ndarray:
    """Per row, (w_last, w_second) as int16 in units of 2**-ROW_WEIGHT_FRACTION_BITS: each
    row's least-squares fit, (0, 0) for a row with no usable fit."""
    weights = np.zeros((sums.shape[0], 2), np.int16)
    for row in range(sums.shape[0]):
        fit = fitted_linear_weights(sums[row], two_rounds)
        if fit is not None:
            weights[row] = [round(w * (1 << ROW_WEIGHT_FRACTION_BITS)) for w in fit]
    return weights


def row_weights_as_floats(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int16 pairs as the two float64 arrays the kernels take (exact: a power-of-2 scale)."""
    scaled = weights.astype(np.float64) / (1 << ROW_WEIGHT_FRACTION_BITS)
    return np.ascontiguousarray(scaled[:, 0]), np.ascontiguousarray(scaled[:, 1])


def fitted_linear_weights(sums: np.ndarray, two_rounds: bool) -> tuple[float, float] | None:
    """(w_last, w_second) minimizing the squared residual, or None when no usable fit exists.
    With one round of history (or collinear rounds) only w_last is fitted."""
    s11, s12, s22, s1x, s2x = (float(v) for v in sums)
    if not (s11 > 0 and all(math.isfinite(v) for v in sums)):
        return None
    weights = (s1x / s11, 0.0)
    det = s11 * s22 - s12 * s12
    if two_rounds and s22 > 0 and det > 1e-9 * s11 * s22:
        weights = ((s1x * s22 - s2x * s12) / det, (s2x * s11 - s1x * s12) / det)
    if not all(math.isfinite(w) and abs(w) <= MAX_LINEAR_WEIGHT for w in weights) or weights[0] == 0.0:
        return None
    return weights


@numba.njit(cache=True, nogil=True)
def linear_signs(last, second_last, w_last, w_second, row_length, signs):
    """The prediction's sign per element (int8, +1 where it is 0 or NaN): the codes are
    oriented by it, so a prediction that undershoots leaves a skew the coder models."""
    row = 0
    row_end = row_length
    for i in range(signs.size):
        if i == row_end:
            row += 1
            row_end += row_length
        signs[i] = -1 if linear_at(last, second_last, w_last, w_second, row, i) < 0.0 else 1
