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
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..parallel import each, spans

# numba fastmath flags of the encoder-only float sums (linear fits, scale levels): only
# reassociation, so LLVM vectorizes their reductions, and never 'nnan'/'ninf' (their
# finiteness checks must stay). What they yield is sent, so the decoder never recomputes it;
# kernels both sides run never use fastmath (docs/guarantees.md). Defined in a kernel module,
# so a change of it drops every cached kernel (kernel_cache.py), as numba would not.
ENCODER_SUMS = {"reassoc"}

# Bucket 0 holds predicted magnitudes below 1/8 of a step; each next bucket doubles.
N_MAGNITUDE_BUCKETS = 12
_SMALLEST_BUCKET_LOG2 = -3


@numba.njit(cache=True, nogil=True, inline="always")
def _predicted_magnitude(ema, mean, std, i):
    # |M std + mean|, the magnitude predictor (as quantize._shift_at), computed where it is used so no
    # model-sized float64 buffer is needed (encoder and decoder both run these kernels).
    return abs(np.float64(ema[i]) * std + mean)


@numba.njit(cache=True, nogil=True)
def magnitude_contexts(ema, mean, std, eb, contexts):
    """contexts[i] = log2 bucket of the predicted magnitude |ema[i] std + mean| / (2 eb),
    clipped to the bucket range."""
    inv_step = 1.0 / (2.0 * eb)
    for i in range(ema.size):
        steps = _predicted_magnitude(ema, mean, std, i) * inv_step
        # The exponent bits are floor(log2(steps)), exactly and far faster than log2; 0 and
        # subnormals fall in bucket 0, Inf and NaN in the last.
        exponent = (_float_bits(steps) >> 52) & _INFINITE_EXPONENT
        bucket = exponent - _EXPONENT_BIAS + 1 - _SMALLEST_BUCKET_LOG2
        if exponent == 0:
            bucket = 0
        elif exponent == _INFINITE_EXPONENT:
            bucket = N_MAGNITUDE_BUCKETS - 1
        bucket = min(max(bucket, 0), N_MAGNITUDE_BUCKETS - 1)
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


def merged_contexts(contexts: np.ndarray, shift: int, n_contexts: int = N_MAGNITUDE_BUCKETS) -> tuple[np.ndarray, int]:
    """Buckets merged 2**shift at a time, and the resulting number of contexts."""
    return contexts >> np.uint8(shift), merged_count(n_contexts, shift)


def merged_count(n_contexts: int, shift: int) -> int:
    """How many contexts n_contexts buckets merge into, 2**shift at a time."""
    return (n_contexts + (1 << shift) - 1) >> shift


# ---- scale contexts: this round's per-row and per-column magnitudes as side information ----
#
# Gradients of linear and conv layers are sums of outer products, so |g[i, j, k]| tracks
# row_scale[i] * col_scale[j] * tap_scale[k] (rows: output channels, axis 0; columns: axis 1;
# taps: a conv's kernel positions, the axes after the second, flattened). The encoder sends
# the scales as integer quarter-octave levels, so the decoder derives bit-identical contexts
# by integer arithmetic. Taps differ where a kernel position sees the input's border more
# often than others; on a feature map of 1 x 1 (a ResNet's last stage on small images) only
# the centre tap has a gradient at all, and a zero tap puts its elements in ZERO_SCALE_BUCKET.

LEVELS_PER_OCTAVE = 4
ZERO_LEVEL = -(1 << 15)  # the level of 0 (an all-zero row, column or tap: ZERO_SCALE_BUCKET)
_EXPONENT_BIAS = 1023
_INFINITE_EXPONENT = 0x7FF
_MANTISSA_MASK = (1 << 52) - 1
# Mantissa bits of 2^(1/4), 2^(1/2), 2^(3/4): x's mantissa passes k of them where
# 1.mantissa >= 2^(k/4), so comparing bits is comparing the floats.
_QUARTER_OCTAVE_MANTISSAS = tuple(int(np.array([2.0 ** (k / 4)]).view(np.int64)[0]) & _MANTISSA_MASK for k in (1, 2, 3))
_M1, _M2, _M3 = _QUARTER_OCTAVE_MANTISSAS


@intrinsic
def _float_bits(typingctx, value):
    """The IEEE-754 bits of a float64, as an int64 (a bitcast)."""
    if value != types.float64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return types.int64(types.float64), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def quarter_octave_level(x):
    """floor(4 log2 abs(x)) for normal x (exact: the exponent bits and fixed mantissa
    thresholds, no libm); ZERO_LEVEL for 0, subnormals, Inf and NaN."""
    bits = _float_bits(np.float64(x)) & 0x7FFFFFFFFFFFFFFF
    exponent = bits >> 52
    if exponent == 0 or exponent == _INFINITE_EXPONENT:
        return ZERO_LEVEL
    mantissa = bits & _MANTISSA_MASK
    return (LEVELS_PER_OCTAVE * (exponent - _EXPONENT_BIAS) + np.int64(mantissa >= _M1) + np.int64(mantissa >= _M2)
            + np.int64(mantissa >= _M3))


@numba.njit(cache=True, nogil=True, fastmath=ENCODER_SUMS)
def scale_levels(values, unit, rows, cols, row_levels, col_levels, tap_levels):
    """Quarter-octave levels of each row's, column's and tap's mean |x| x unit (finite
    elements), the columns and taps relative to the whole tensor's mean, so row + column + tap
    is the element's level. tap_levels: one per kernel position where the tensor has more
    than two axes (values.size / (rows cols) of them), else empty.
    values: the tensor (unit 1.0), or a prediction's codes (unit 2 eb), whose coding
    contexts should follow the residual, not the value. Encoder only (the levels are sent),
    so the sums may run in any order: a row's in four partial sums, which breaks the add
    chain (3x faster on a 768 x 3072 layer), and reassociated (ENCODER_SUMS: 1.5x more on
    256 x 4096)."""
    col_sum = np.zeros(cols)
    col_count = np.zeros(cols, np.int64)
    row_sum = np.zeros(rows)
    row_count = np.zeros(rows, np.int64)
    inner = values.size // (rows * cols)
    tap_sum = np.zeros(inner)
    tap_count = np.zeros(inner, np.int64)
    span = cols * inner
    for i in range(rows):
        block = values[i * span : (i + 1) * span]  # a slice: indexing from 0 spares negative-index checks
        r0 = r1 = r2 = r3 = 0.0
        n_row = 0
        if inner == 1:
            grouped = cols - cols % 4
            for j in range(0, grouped, 4):
                v0 = abs(np.float64(block[j])) * unit
                v1 = abs(np.float64(block[j + 1])) * unit
                v2 = abs(np.float64(block[j + 2])) * unit
                v3 = abs(np.float64(block[j + 3])) * unit
                f0, f1, f2, f3 = math.isfinite(v0), math.isfinite(v1), math.isfinite(v2), math.isfinite(v3)
                v0, v1, v2, v3 = v0 if f0 else 0.0, v1 if f1 else 0.0, v2 if f2 else 0.0, v3 if f3 else 0.0
                r0 += v0
                r1 += v1
                r2 += v2
                r3 += v3
                col_sum[j] += v0
                col_sum[j + 1] += v1
                col_sum[j + 2] += v2
                col_sum[j + 3] += v3
                col_count[j] += f0
                col_count[j + 1] += f1
                col_count[j + 2] += f2
                col_count[j + 3] += f3
                n_row += f0 + f1 + f2 + f3
            for j in range(grouped, cols):  # the last cols % 4 (the unrolled loop's tail)
                v = abs(np.float64(block[j])) * unit
                finite = math.isfinite(v)
                v = v if finite else 0.0
                r0 += v
                col_sum[j] += v
                col_count[j] += finite
                n_row += finite
        else:
            for j in range(cols):
                column = 0.0
                count = 0
                for k in range(inner):
                    v = abs(np.float64(block[j * inner + k])) * unit
                    finite = math.isfinite(v)
                    v = v if finite else 0.0
                    column += v
                    count += finite
                    tap_sum[k] += v
                    tap_count[k] += finite
                col_sum[j] += column
                col_count[j] += count
                r0 += column
                n_row += count
        row_sum[i] = (r0 + r1) + (r2 + r3)
        row_count[i] = n_row
    total = row_sum.sum()
    count = row_count.sum()
    mean_level = quarter_octave_level(total / count) if count else ZERO_LEVEL
    for i in range(rows):
        row_levels[i] = quarter_octave_level(row_sum[i] / row_count[i]) if row_count[i] else ZERO_LEVEL
    for j in range(cols):
        col_levels[j] = _relative_level(col_sum[j], col_count[j], mean_level)
    for k in range(min(tap_levels.size, inner)):
        tap_levels[k] = _relative_level(tap_sum[k], tap_count[k], mean_level)


@numba.njit(cache=True, nogil=True, inline="always")
def _relative_level(total, count, mean_level):
    """The level of total / count against the tensor's mean level (ZERO_LEVEL where either is)."""
    level = quarter_octave_level(total / count) if count else ZERO_LEVEL
    return ZERO_LEVEL if level == ZERO_LEVEL or mean_level == ZERO_LEVEL else level - mean_level


# Scale contexts are finer than the EMA's octaves: N_FITTED_BUCKETS quarter-octave buckets of
# the fitted level, from 2^-3.25 steps (bucket 0, also every zero prediction) to 2^12.5 steps,
# and one more for the elements of an all-zero row, column or tap (stream version 11). Their
# codes are zero (the level is ZERO_LEVEL only where every finite element is 0, or for F64
# values whose mean is a float64 subnormal, which are then coded there like any others), so
# in a bucket of their own they cost nothing and the rANS coder passes over them (a context
# of one certain token, rans.CERTAIN_SKIP_SHARE): an embedding's untouched rows, a layer's
# dead units, a 1 x 1 feature map's zero taps. Its index stays apart from the others under
# every merge (64 >> s > 63 >> s).
N_FITTED_BUCKETS = 64
ZERO_SCALE_BUCKET = N_FITTED_BUCKETS
N_SCALE_BUCKETS = N_FITTED_BUCKETS + 1
_SCALE_BUCKET_OF_LEVEL_0 = 13
# Fitted weights are sixteenths: level = (w_scale S + w_ema P + offset) >> 4.
WEIGHT_ONE = 16
MAX_WEIGHT = 4 * WEIGHT_ONE
MAX_OFFSET = 1 << 16


# A row, column or tap term at ZERO_LEVEL: any sum holding one is below _ZERO_TERM / 2, and
# every other sum is far above it (|w_scale level| < 2^22 for each part, |offset| <= 2^16).
_ZERO_TERM = -(1 << 40)


@numba.njit(cache=True, nogil=True, inline="always")
def _fitted_bucket(scale_term, predicted_level, w_ema):
    # scale_term = w_scale S + offset, already summed from its row, column and tap parts.
    if scale_term < _ZERO_TERM // 2:
        return ZERO_SCALE_BUCKET
    if predicted_level == ZERO_LEVEL:
        return 0
    level = (scale_term + w_ema * predicted_level) >> 4
    return min(max(level + _SCALE_BUCKET_OF_LEVEL_0, 0), N_FITTED_BUCKETS - 1)


@numba.njit(cache=True, nogil=True, inline="always")
def _level_term(level, w_scale):
    return _ZERO_TERM if level == ZERO_LEVEL else w_scale * np.int64(level)


@numba.njit(cache=True, nogil=True)
def scale_contexts(row_levels, col_levels, tap_levels, eb, ema, mean, std, w_scale, w_ema, offset, contexts):
    """contexts[i] = quarter-octave bucket of the element's fitted level in steps (2 eb),
    (w_scale S + w_ema P + offset) >> 4, where S is its row + column + tap scale level (no tap
    where tap_levels is empty) and P the level of its predicted magnitude (only with a state:
    ema non-empty); ZERO_SCALE_BUCKET where its row, column or tap level is ZERO_LEVEL."""
    rows, cols = row_levels.size, col_levels.size
    inner = contexts.size // (rows * cols)
    step_level = quarter_octave_level(2.0 * eb)
    inv_step = 1.0 / (2.0 * eb)
    with_prediction = ema.size > 0
    # w_scale S + offset = row term + column term + tap term, each summed once instead of per element.
    col_terms = np.empty(cols, np.int64)
    for j in range(cols):
        col_terms[j] = _level_term(col_levels[j], w_scale)
    tap_terms = np.zeros(inner, np.int64)
    for k in range(min(tap_levels.size, inner)):
        tap_terms[k] = _level_term(tap_levels[k], w_scale)
    for i in range(rows):
        base = i * cols * inner
        if row_levels[i] == ZERO_LEVEL:
            contexts[base:base + cols * inner] = ZERO_SCALE_BUCKET
            continue
        row_term = w_scale * (np.int64(row_levels[i]) - step_level) + offset
        if inner == 1:
            # Linear layers: one flat loop over row slices indexed from 0, which spares every
            # access numba's negative-index check (2x here; 2.4x without a state).
            contexts_row = contexts[base:base + cols]
            ema_row = ema[base:base + cols] if with_prediction else ema
            for j in range(cols):
                predicted = (quarter_octave_level(_predicted_magnitude(ema_row, mean, std, j) * inv_step)
                             if with_prediction else np.int64(0))
                contexts_row[j] = _fitted_bucket(row_term + col_terms[j], predicted, w_ema)
            continue
        for j in range(cols):
            term = row_term + col_terms[j]
            start = base + j * inner
            for k in range(inner):
                at = np.uint64(start + k)  # unsigned: no negative-index check
                predicted = np.int64(0)
                if with_prediction:
                    predicted = quarter_octave_level(_predicted_magnitude(ema, mean, std, at) * inv_step)
                contexts[at] = _fitted_bucket(term + tap_terms[k], predicted, w_ema)


def scale_contexts_on(row_levels, col_levels, tap_levels, eb, ema, mean, std, w_scale, w_ema, offset, contexts,
                      threads=1) -> None:
    """scale_contexts, a large tensor's in ranges of whole rows on up to `threads` threads
    (each element's context is its own: the same contexts)."""
    row_size = max(1, contexts.size // max(row_levels.size, 1))
    ranges = spans(contexts.size, threads, row_size)
    if len(ranges) == 1:
        scale_contexts(row_levels, col_levels, tap_levels, eb, ema, mean, std, w_scale, w_ema, offset, contexts)
        return

    def run(span):
        a, b = span
        scale_contexts(row_levels[a // row_size:-(-b // row_size)], col_levels, tap_levels, eb, ema[a:b] if ema.size else ema,
                       mean, std, w_scale, w_ema, offset, contexts[a:b])

    each(run, ranges, threads)


@numba.njit(cache=True, nogil=True, inline="always")
def _with_fit_terms(acc, s, t, p, used):
    """acc (n, S, P, T, SS, PP, SP, ST, PT) with one element's terms added, times used (0 or 1)."""
    n, s_sum, p_sum, t_sum, ss, pp, sp, st, pt = acc
    s, t, p = s * used, t * used, p * used
    return (n + used, s_sum + s, p_sum + p, t_sum + t, ss + s * s, pp + p * p, sp + s * p, st + s * t, pt + p * t)


@numba.njit(cache=True, nogil=True)
def scale_fit_sums(values, unit, row_levels, col_levels, tap_levels, eb, ema, mean, std, sums, first_row=0, row_step=1):
    """Least-squares sums for the level of |x| x unit in steps, T, against S and P (see
    scale_contexts), over the elements where all three are defined: sums += n, S, P, T, SS,
    PP, SP, ST, PT; of rows first_row, first_row + row_step, ... only. values and unit as for
    scale_levels. Encoder only: the weights it yields are sent. The levels are integers, so
    the sums are int64 (exact in any order) and an element whose level is undefined is added
    with weight 0 instead of skipped: no branch."""
    rows, cols = row_levels.size, col_levels.size
    inner = values.size // (rows * cols)
    step_level = quarter_octave_level(2.0 * eb)
    inv_step = 1.0 / (2.0 * eb)
    with_prediction = ema.size > 0
    taps = np.zeros(inner, np.int64)  # (no tap levels: every tap's part is 0)
    for k in range(min(tap_levels.size, inner)):
        taps[k] = tap_levels[k]
    zero = np.int64(0)
    acc = (zero, zero, zero, zero, zero, zero, zero, zero, zero)
    span = cols * inner
    for i in range(first_row, rows, row_step):
        if row_levels[i] == ZERO_LEVEL:
            continue
        row_part = np.int64(row_levels[i]) - step_level
        block = values[i * span : (i + 1) * span]  # slices indexed from 0: no negative-index checks
        ema_block = ema[i * span : (i + 1) * span] if with_prediction else ema
        if inner == 1:  # linear layers: one flat loop over the row, which vectorizes (3.4x)
            for j in range(cols):
                t = quarter_octave_level(abs(np.float64(block[j])) * unit * inv_step)
                p = quarter_octave_level(_predicted_magnitude(ema_block, mean, std, j) * inv_step) if with_prediction else zero
                used = np.int64((col_levels[j] != ZERO_LEVEL) & (t != ZERO_LEVEL) & (p != ZERO_LEVEL))
                acc = _with_fit_terms(acc, row_part + np.int64(col_levels[j]), t, p, used)
            continue
        for j in range(cols):  # conv layers: a column's kernel positions share its part of S
            if col_levels[j] == ZERO_LEVEL:
                continue
            s = row_part + np.int64(col_levels[j])
            for k in range(inner):
                at = j * inner + k
                t = quarter_octave_level(abs(np.float64(block[at])) * unit * inv_step)
                p = quarter_octave_level(_predicted_magnitude(ema_block, mean, std, at) * inv_step) if with_prediction else zero
                used = np.int64((t != ZERO_LEVEL) & (p != ZERO_LEVEL) & (taps[k] != ZERO_LEVEL))
                acc = _with_fit_terms(acc, s + taps[k], t, p, used)
    for slot in range(9):
        sums[slot] += acc[slot]


def scale_fit_sums_on(values, unit, row_levels, col_levels, tap_levels, eb, ema, mean, std, sums, threads=1,
                      row_step=1) -> None:
    """scale_fit_sums of every row_step-th row, a large tensor's in ranges of whole rows on up
    to `threads` threads: the sums are integers (exact in any order), so the same sums."""
    row_size = max(1, values.size // max(row_levels.size, 1))
    ranges = spans(values.size, threads, row_size)
    if len(ranges) == 1:
        scale_fit_sums(values, unit, row_levels, col_levels, tap_levels, eb, ema, mean, std, sums, 0, row_step)
        return

    def run(span):
        a, b = span
        part = np.zeros(sums.size)
        scale_fit_sums(values[a:b], unit, row_levels[a // row_size:-(-b // row_size)], col_levels, tap_levels, eb,
                       ema[a:b] if ema.size else ema, mean, std, part, -(a // row_size) % row_step, row_step)
        return part

    for part in each(run, ranges, threads):
        sums += part


def fitted_weights(sums: np.ndarray, with_prediction: bool) -> tuple[int, int, int]:
    """(w_scale, w_ema, offset) in sixteenths from scale_fit_sums, by least squares; the plain
    mean of S and P (or S alone) where the fit is degenerate."""
    n, s, p, t, ss, pp, sp, st, pt = (float(v) for v in sums)
    fallback = (WEIGHT_ONE // 2, WEIGHT_ONE // 2, 0) if with_prediction else (WEIGHT_ONE, 0, 0)
    if with_prediction:
        normal = np.array([[ss, sp, s], [sp, pp, p], [s, p, n]])
        target = np.array([st, pt, t])
    else:
        normal = np.array([[ss, s], [s, n]])
        target = np.array([st, t])
    if n < 16 or not np.all(np.isfinite(normal)) or abs(np.linalg.det(normal)) < 1e-9 * max(1.0, np.abs(normal).max()) ** len(target):
        return fallback
    solution = np.linalg.solve(normal, target)
    if not np.all(np.isfinite(solution)):
        return fallback
    w_scale = int(np.clip(round(solution[0] * WEIGHT_ONE), 0, MAX_WEIGHT))
    w_ema = int(np.clip(round(solution[1] * WEIGHT_ONE), 0, MAX_WEIGHT)) if with_prediction else 0
    offset = int(np.clip(round(solution[-1] * WEIGHT_ONE), -MAX_OFFSET, MAX_OFFSET))
    return w_scale, w_ema, offset
