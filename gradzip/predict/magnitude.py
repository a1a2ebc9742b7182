"""Magnitude predictor: a per-element EMA of normalized reconstructed magnitudes.

After each round, z = (|x'| - mean|x'|) / std|x'| and M <- (1 - beta) M + beta z (M = z on a
tensor's first round, so the average is not dragged towards zero). The next round predicts
|M * std_t + mean_t|, where mean_t and std_t are that round's magnitude statistics, sent as
side information. Non-finite elements are left out of the statistics and count as z = 0.
"""
from __future__ import annotations

import math

import numba
import numpy as np

# EMA weight of the newest round; 0.6 gave the best geometric-mean ratio on the bench corpus
# (docs/design.md), where 0.3 and 0.9 were within 1%.
DEFAULT_BETA = 0.6


# One pass's variance, E|x|^2 - (E|x|)^2, is kept when it is at least this share of E|x|^2;
# below it the subtraction cancels too many digits and two passes recompute it. Likewise
# below a mean square where squares of typical elements fall into float64's subnormals.
_ONE_PASS_MIN_SPREAD = 1e-6
_ONE_PASS_MIN_SQUARE = 1e-290
_CHUNK_BLOCKS = 512  # blocks of 8 elements summed per chunk (a multiple of 4: 8 KiB of scratch)


@numba.njit(cache=True, nogil=True)
def magnitude_stats(values):
    """Mean and standard deviation of |x| over the finite elements (0, 0 if none).

    One pass without finiteness checks: each block of 8 elements gets its sum of |x| and of
    |x|^2 in a fixed tree (a loop whose iterations are independent, which the compiler
    vectorizes), block b's sums go to partial sum b mod 4, and the elements after the last
    whole block to partial sum 0. The order is fixed, so both sides' states stay identical;
    3.4x faster than the two passes of four partial sums before (0.35 against 1.2 ns an
    element, 1M float32 values). Where the variance cancels, or a sum is not finite, two
    passes recompute the statistics."""
    n = values.size
    if n == 0:
        return 0.0, 0.0
    n_blocks = n // 8
    block_s = np.empty(min(n_blocks, _CHUNK_BLOCKS))
    block_q = np.empty(block_s.size)
    s0 = s1 = s2 = s3 = 0.0
    q0 = q1 = q2 = q3 = 0.0
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        count = min(n_blocks - start, _CHUNK_BLOCKS)
        _block_sums(values[8 * start : 8 * (start + count)], block_s[:count], block_q[:count])
        whole = count - count % 4
        for b in range(0, whole, 4):
            s0 += block_s[b]
            s1 += block_s[b + 1]
            s2 += block_s[b + 2]
            s3 += block_s[b + 3]
            q0 += block_q[b]
            q1 += block_q[b + 1]
            q2 += block_q[b + 2]
            q3 += block_q[b + 3]
        if count > whole:  # (the last chunk only)
            s0 += block_s[whole]
            q0 += block_q[whole]
        if count > whole + 1:
            s1 += block_s[whole + 1]
            q1 += block_q[whole + 1]
        if count > whole + 2:
            s2 += block_s[whole + 2]
            q2 += block_q[whole + 2]
    for i in range(8 * n_blocks, n):
        a = abs(np.float64(values[i]))
        s0 += a
        q0 += a * a
    mean = ((s0 + s1) + (s2 + s3)) / n
    mean_square = ((q0 + q1) + (q2 + q3)) / n
    spread = mean_square - mean * mean
    # (mean_square >= _ONE_PASS_MIN_SQUARE makes the spread's bound, and so the spread, positive)
    if (math.isfinite(mean_square) and mean_square >= _ONE_PASS_MIN_SQUARE
            and spread >= _ONE_PASS_MIN_SPREAD * mean_square):
        return mean, math.sqrt(spread)
    return _two_pass_magnitude_stats(values)


@numba.njit(cache=True, nogil=True)
def _block_sums(values, block_s, block_q):
    """block_s[k], block_q[k]: the sums of |x| and |x|^2 over values[8k : 8k + 8], each in one
    fixed tree. (Written over the outputs' length, from 8k: LLVM vectorizes this form, not
    one that offsets the index by an argument, 2.3x apart.)"""
    for k in range(block_s.size):
        j = 8 * k
        a0 = abs(np.float64(values[j]))
        a1 = abs(np.float64(values[j + 1]))
        a2 = abs(np.float64(values[j + 2]))
        a3 = abs(np.float64(values[j + 3]))
        a4 = abs(np.float64(values[j + 4]))
        a5 = abs(np.float64(values[j + 5]))
        a6 = abs(np.float64(values[j + 6]))
        a7 = abs(np.float64(values[j + 7]))
        block_s[k] = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
        block_q[k] = ((a0 * a0 + a1 * a1) + (a2 * a2 + a3 * a3)) + ((a4 * a4 + a5 * a5) + (a6 * a6 + a7 * a7))


@numba.njit(cache=True, nogil=True)
def _two_pass_magnitude_stats(values):
    """magnitude_stats in two passes (the mean, then the squared deviations), four partial
    sums each; a non-finite result goes through the checked loops, which leave non-finite
    elements out."""
    n = values.size
    n4 = n - n % 4
    s0 = s1 = s2 = s3 = 0.0
    for i in range(0, n4, 4):
        s0 += abs(np.float64(values[i]))
        s1 += abs(np.float64(values[i + 1]))
        s2 += abs(np.float64(values[i + 2]))
        s3 += abs(np.float64(values[i + 3]))
    for i in range(n4, n):
        s0 += abs(np.float64(values[i]))
    mean = ((s0 + s1) + (s2 + s3)) / n
    if math.isfinite(mean):
        d0 = d1 = d2 = d3 = 0.0
        for i in range(0, n4, 4):
            e0 = abs(np.float64(values[i])) - mean
            e1 = abs(np.float64(values[i + 1])) - mean
            e2 = abs(np.float64(values[i + 2])) - mean
            e3 = abs(np.float64(values[i + 3])) - mean
            d0 += e0 * e0
            d1 += e1 * e1
            d2 += e2 * e2
            d3 += e3 * e3
        for i in range(n4, n):
            e0 = abs(np.float64(values[i])) - mean
            d0 += e0 * e0
        spread = ((d0 + d1) + (d2 + d3)) / n
        if math.isfinite(spread):
            return mean, math.sqrt(spread)
    return _checked_magnitude_stats(values)


@numba.njit(cache=True, nogil=True)
def _checked_magnitude_stats(values):
    total = 0.0
    count = 0
    for i in range(values.size):
        v = np.float64(values[i])
        if math.isfinite(v):
            total += abs(v)
            count += 1
    if count == 0:
        return 0.0, 0.0
    mean = total / count
    spread = 0.0
    for i in range(values.size):
        v = np.float64(values[i])
        if math.isfinite(v):
            d = abs(v) - mean
            spread += d * d
    return mean, math.sqrt(spread / count)


@numba.njit(cache=True, nogil=True, inline="always")
def ema_normalization(recon):
    """(mean, 1 / std) that turn a reconstructed magnitude into z (both 0 where the
    statistics overflowed, values near the float max: then z = 0)."""
    mean, std = magnitude_stats(recon)
    inv_std = 1.0 / std if std > 0.0 else 0.0
    if not (math.isfinite(mean) and math.isfinite(std)):
        return 0.0, 0.0
    return mean, inv_std


@numba.njit(cache=True, nogil=True, inline="always")
def ema_step(old, value, mean, inv_std, beta, first_round):
    """The EMA element after folding in one reconstructed value (float32)."""
    v = np.float64(value)
    z = (abs(v) - mean) * inv_std if math.isfinite(v) else 0.0
    if first_round:
        return np.float32(z)
    return np.float32((1.0 - beta) * np.float64(old) + beta * z)
