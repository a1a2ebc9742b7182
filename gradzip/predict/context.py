"""Coding contexts from the cross-round state, for the context-modelled entropy coder.

Instead of shifting each value by a prediction (which hurts when the predicted sign is wrong),
this keeps the prediction at zero and tells the entropy coder what to expect: the context of an
element is a log2 bucket of its predicted magnitude in units of the quantization step, so
elements expected to be large and small get separate code distributions. Codes are multiplied by
the previous round's sign, so the coder also learns whether signs persist or oscillate.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# Bucket 0 holds predicted magnitudes below 1/8 of a step; each next bucket doubles.
N_MAGNITUDE_BUCKETS = 12
_SMALLEST_BUCKET_LOG2 = -3


@numba.njit(cache=True, nogil=True, inline="always")
def _predicted_magnitude(ema, mean, std, i):
    # |M std + mean|, as predict.magnitude.predict_magnitude, computed where it is used so no
    # model-sized float64 buffer is needed (encoder and decoder both run these kernels).
    return abs(np.float64(ema[i]) * std + mean)


@numba.njit(cache=True, nogil=True)
def magnitude_contexts(ema, mean, std, eb, contexts):
    """contexts[i] = log2 bucket of the predicted magnitude |ema[i] std + mean| / (2 eb),
    clipped to the bucket range."""
    inv_step = 1.0 / (2.0 * eb)
    for i in range(ema.size):
        steps = _predicted_magnitude(ema, mean, std, i) * inv_step
        bucket = 0
        if steps > 0.0 and math.isfinite(steps):
            # frexp gives floor(log2(steps)) + 1 exactly, and far faster than log2.
            bucket = math.frexp(steps)[1] - _SMALLEST_BUCKET_LOG2
            bucket = min(max(bucket, 0), N_MAGNITUDE_BUCKETS - 1)
        elif not math.isfinite(steps):
            bucket = N_MAGNITUDE_BUCKETS - 1
        contexts[i] = bucket


@numba.njit(cache=True, nogil=True)
def orient_by_sign(codes, signs):
    """Multiply codes by signs (+1 where the sign is 0), in place; its own inverse."""
    for i in range(codes.size):
        if signs[i] < 0:
            codes[i] = -codes[i]


# Small tensors cannot pay for a frequency table per bucket: the encoder may merge 2 or 4
# neighbouring buckets (a shift of 1 or 2) and keeps whichever is smaller.
MAX_MERGE_SHIFT = 2


def merged_contexts(contexts: np.ndarray, shift: int) -> tuple[np.ndarray, int]:
    """Buckets merged 2**shift at a time, and the resulting number of contexts."""
    return contexts >> np.uint8(shift), (N_MAGNITUDE_BUCKETS + (1 << shift) - 1) >> shift


# ---- scale contexts: this round's per-row and per-column magnitudes as side information ----
#
# Gradients of linear and conv layers are sums of outer products, so |g[i, j, ...]| tracks
# row_scale[i] * col_scale[j] (rows: output channels, axis 0; columns: axis 1; the kernel
# positions of a conv share their (i, j) scale). The encoder sends both scales as integer
# quarter-octave levels, so the decoder derives bit-identical contexts by integer arithmetic.

LEVELS_PER_OCTAVE = 4
ZERO_LEVEL = -(1 << 15)  # the level of 0 (an all-zero row or column): always bucket 0
_QUARTER_OCTAVES = (2.0**0.25, 2.0**0.5, 2.0**0.75)


@numba.njit(cache=True, nogil=True)
def quarter_octave_level(x):
    """floor(4 log2 x) for finite x > 0 (exact: frexp and fixed thresholds, no libm log2);
    ZERO_LEVEL for 0, anything negative or not finite."""
    if not (x > 0.0 and math.isfinite(x)):
        return ZERO_LEVEL
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    mantissa *= 2.0
    level = LEVELS_PER_OCTAVE * (exponent - 1)
    for threshold in _QUARTER_OCTAVES:
        if mantissa >= threshold:
            level += 1
    return level


@numba.njit(cache=True, nogil=True)
def scale_levels(values, rows, cols, row_levels, col_levels):
    """Quarter-octave levels of each row's and column's mean |x| (finite elements), the
    columns relative to the whole tensor's mean, so row + column is the element's level."""
    row_sum = np.zeros(rows)
    col_sum = np.zeros(cols)
    row_count = np.zeros(rows, np.int64)
    col_count = np.zeros(cols, np.int64)
    inner = values.size // (rows * cols)
    total = 0.0
    count = 0
    for i in range(rows):
        for j in range(cols):
            base = (i * cols + j) * inner
            for k in range(inner):
                v = abs(np.float64(values[base + k]))
                if math.isfinite(v):
                    row_sum[i] += v
                    col_sum[j] += v
                    row_count[i] += 1
                    col_count[j] += 1
                    total += v
                    count += 1
    mean_level = quarter_octave_level(total / count) if count else ZERO_LEVEL
    for i in range(rows):
        row_levels[i] = quarter_octave_level(row_sum[i] / row_count[i]) if row_count[i] else ZERO_LEVEL
    for j in range(cols):
        level = quarter_octave_level(col_sum[j] / col_count[j]) if col_count[j] else ZERO_LEVEL
        col_levels[j] = ZERO_LEVEL if level == ZERO_LEVEL or mean_level == ZERO_LEVEL else level - mean_level


@numba.njit(cache=True, nogil=True)
def _bucket_of_level(level):
    # magnitude_contexts' bucket: floor(log2 steps) - _SMALLEST_BUCKET_LOG2 + 1, clipped.
    bucket = (level >> 2) - _SMALLEST_BUCKET_LOG2 + 1
    return min(max(bucket, 0), N_MAGNITUDE_BUCKETS - 1)


@numba.njit(cache=True, nogil=True)
def scale_contexts(row_levels, col_levels, eb, ema, mean, std, contexts):
    """contexts[i] = bucket of the element's scale level in units of the step 2 eb; with a
    state (ema non-empty), of the mean of that level and the predicted magnitude's level."""
    rows, cols = row_levels.size, col_levels.size
    inner = contexts.size // (rows * cols)
    step_level = quarter_octave_level(2.0 * eb)
    inv_step = 1.0 / (2.0 * eb)
    with_prediction = ema.size > 0
    for i in range(rows):
        for j in range(cols):
            level = np.int64(row_levels[i]) + np.int64(col_levels[j]) - step_level
            zero = row_levels[i] == ZERO_LEVEL or col_levels[j] == ZERO_LEVEL
            base = (i * cols + j) * inner
            for k in range(inner):
                if with_prediction:
                    predicted = quarter_octave_level(_predicted_magnitude(ema, mean, std, base + k) * inv_step)
                    if zero or predicted == ZERO_LEVEL:
                        contexts[base + k] = 0
                    else:
                        contexts[base + k] = _bucket_of_level((level + predicted) >> 1)
                else:
                    contexts[base + k] = 0 if zero else _bucket_of_level(level)
