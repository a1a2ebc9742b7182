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


@numba.njit(cache=True, nogil=True)
def magnitude_contexts(predicted_magnitude, eb, contexts):
    """contexts[i] = log2 bucket of predicted_magnitude[i] / (2 eb), clipped to the bucket range."""
    inv_step = 1.0 / (2.0 * eb)
    for i in range(predicted_magnitude.size):
        steps = predicted_magnitude[i] * inv_step
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
