"""Linear predictor: this round's values from the last two rounds' reconstructions.

p = w_last * r[t-1] + w_second * r[t-2], element by element in float64 (in the quantizer's
kernels, which also orient the codes by the sign of p), with the two weights fitted by least
squares per tensor and round and sent as side information, either one pair for the whole
tensor or one pair per row (axis 0: an output neuron or channel, whose updates persist to
their own degree). Where updates persist (an FC layer late in training) w_last approaches 1;
a negative w_second picks up updates that turn back. The reconstructions are kept in the
state as float32, so both sides predict from the same numbers whatever the tensor's dtype.
"""
from __future__ import annotations

import math

import numba
import numpy as np

from ..quantize import linear_at  # the one spelling of the prediction
from ..parallel import each, spans
from .context import ENCODER_SUMS

# Fitted weights beyond this are not sent (the fit is then degenerate, not informative).
MAX_LINEAR_WEIGHT = 4.0
# Per-row weights are sent as int16 in units of 2**-ROW_WEIGHT_FRACTION_BITS: far finer than
# any fit is accurate, and exact in float64 on both sides.
ROW_WEIGHT_FRACTION_BITS = 12
# Rows shorter than this do not get weights of their own: 4 bytes each would cost over 1/8
# bit per element (they never won on the corpus) and the fits would cost compression time.
MIN_ROW_ELEMENTS = 256


@numba.njit(cache=True, nogil=True, fastmath=ENCODER_SUMS)
def linear_fit_sums(values, last, second_last, row_length, sums):
    """Per row of row_length elements, the normal equations' sums into sums[row] (5 float64):
    r1 r1, r1 r2, r2 r2, r1 x, r2 x, over the elements where all three are finite (encoder
    only). One row of values.size elements gives the tensor-wide sums. Reassociated, the
    five sums vectorize: 4.4x faster on 1M float32 elements (2.8 -> 0.63 ms)."""
    for row in range(sums.shape[0]):
        s11 = s12 = s22 = s1x = s2x = 0.0
        start = row * row_length
        end = min(values.size, start + row_length)
        x_row, last_row, second_row = values[start:end], last[start:end], second_last[start:end]
        for j in range(end - start):
            x = np.float64(x_row[j])
            a = np.float64(last_row[j])
            b = np.float64(second_row[j])
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


def linear_fit_sums_on(values, last, second_last, row_length, sums, threads=1) -> None:
    """linear_fit_sums, per-row sums of a large tensor in ranges of whole rows on up to
    `threads` threads: each row's sums come from one call over that row either way, so they
    are the same. Tensor-wide sums (one row) take one call."""
    ranges = spans(values.size, threads, row_length) if sums.shape[0] > 1 else [(0, values.size)]
    if len(ranges) == 1:
        linear_fit_sums(values, last, second_last, row_length, sums)
        return

    def run(span):
        a, b = span
        linear_fit_sums(values[a:b], last[a:b], second_last[a:b], row_length, sums[a // row_length:-(-b // row_length)])

    each(run, ranges, threads)


def fitted_row_weights(sums: np.ndarray, two_rounds: bool) -> np.ndarray:
    """Per row, (w_last, w_second) as int16 in units of 2**-ROW_WEIGHT_FRACTION_BITS: each
    row's least-squares fit, (0, 0) for a row with no usable fit."""
    fits = np.zeros((sums.shape[0], 2))
    _fits(sums, two_rounds, fits)
    return np.round(fits * (1 << ROW_WEIGHT_FRACTION_BITS)).astype(np.int16)


def row_weights_as_floats(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The int16 pairs as the two float64 arrays the kernels take (exact: a power-of-2 scale)."""
    scaled = weights.astype(np.float64) / (1 << ROW_WEIGHT_FRACTION_BITS)
    return np.ascontiguousarray(scaled[:, 0]), np.ascontiguousarray(scaled[:, 1])


def fitted_linear_weights(sums: np.ndarray, two_rounds: bool) -> tuple[float, float] | None:
    """(w_last, w_second) minimizing the squared residual, or None when no usable fit exists.
    With one round of history (or collinear rounds) only w_last is fitted."""
    fits = np.zeros((1, 2))
    _fits(np.asarray(sums, np.float64).reshape(1, 5), two_rounds, fits)
    return (float(fits[0, 0]), float(fits[0, 1])) if fits[0, 0] != 0.0 else None


@numba.njit(cache=True, nogil=True)
def _fits(sums, two_rounds, fits):
    """Per row of sums, the least-squares (w_last, w_second) into fits, where usable (finite,
    within MAX_LINEAR_WEIGHT, w_last nonzero); other rows are left at (0, 0)."""
    for row in range(sums.shape[0]):
        s11, s12, s22, s1x, s2x = sums[row, 0], sums[row, 1], sums[row, 2], sums[row, 3], sums[row, 4]
        if not (s11 > 0 and math.isfinite(s11 + s12 + s22 + s1x + s2x)):
            continue
        w_last, w_second = s1x / s11, 0.0
        det = s11 * s22 - s12 * s12
        if two_rounds and s22 > 0 and det > 1e-9 * s11 * s22:
            w_last, w_second = (s1x * s22 - s2x * s12) / det, (s2x * s11 - s1x * s12) / det
        if (math.isfinite(w_last) and math.isfinite(w_second) and abs(w_last) <= MAX_LINEAR_WEIGHT
                and abs(w_second) <= MAX_LINEAR_WEIGHT and w_last != 0.0):
            fits[row, 0] = w_last
            fits[row, 1] = w_second


@numba.njit(cache=True, nogil=True)
def linear_residual(values, last, second_last, w_last, w_second, row_length, out):
    """out (float32) = values - the linear prediction, per row of row_length elements (encoder
    only, for fitting the low-rank part: one pass, no temporaries)."""
    for row in range(w_last.size):
        a, b = w_last[row], w_second[row]
        start = row * row_length
        end = min(values.size, start + row_length)
        x_row, last_row, second_row, out_row = values[start:end], last[start:end], second_last[start:end], out[start:end]
        for j in range(end - start):
            out_row[j] = np.float32(np.float64(x_row[j]) - linear_at(a, b, last_row[j], second_row[j]))
