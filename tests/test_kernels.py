"""Kernels against plain references: the quantizer's blocked rows, the low-rank offset's
column blocks, the scale levels' partial sums, the scale fit's branch-free sums, the
out-of-place EMA update and the one-pass state update."""
from __future__ import annotations

import numpy as np
import pytest

from gradzip.codec import CodecConfig, advance_state
from gradzip.predict.context import ZERO_LEVEL, quarter_octave_level, scale_fit_sums, scale_levels
from gradzip.predict.history import fold_round
from gradzip.predict.linear import linear_fit_sums
from gradzip.predict.lowrank import Factors, low_rank_offset
from gradzip.predict.magnitude import magnitude_stats
from gradzip.quantize import (RADIUS, dequantize, escaped_deltas, finite_range, patch_escape_deltas, quantize,
                              recheck_narrowed, value_range)
from gradzip.state import TensorState
from gradzip.tensorio import as_bfloat16, dtype_name

_EMPTY32 = np.empty(0, np.float32)
_NO_SIGNS = np.empty(0, np.int8)


def _linear_quantize(values, last, second, w_last, w_second, eb, keep_recon):
    n = values.size
    codes, escaped = np.empty(n, np.int32), np.empty(n, np.bool_)
    recon = np.empty(n if keep_recon else 0, values.dtype)
    n_escaped = quantize(values, _EMPTY32, 0.0, 0.0, _NO_SIGNS, last, second, w_last, w_second, n // w_last.size,
                         _EMPTY32, 0.0, eb, codes, recon, escaped, eb)
    return codes, recon, escaped, n_escaped


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rows,row_length", [(3, 4095), (2, 4096), (3, 4097), (2, 10000), (1, 3 * 4097)])
def test_blocked_linear_rows_keep_the_bound_and_match_dequantize(dtype, rows, row_length):
    """Rows go through the quantizer in blocks of 4096: every row length, with or without
    recon, gives the same codes, escapes the same elements (NaN, Inf, -0.0, far outliers),
    keeps the bound, and dequantize (not blocked) rebuilds every other element exactly."""
    rng = np.random.default_rng(row_length)
    n = rows * row_length
    last = rng.normal(size=n).astype(np.float32)
    second = rng.normal(size=n).astype(np.float32)
    values = (0.7 * last - 0.2 * second + 0.1 * rng.normal(size=n)).astype(dtype)
    special = rng.choice(n, 40, replace=False)
    values[special[:8]] = np.nan
    values[special[8:16]] = np.inf
    values[special[16:20]] = -np.inf
    values[special[20:28]] = -0.0
    values[special[28:]] = 1e6  # residual far beyond RADIUS bins
    w_last = rng.uniform(0.5, 1.0, rows)
    w_second = rng.uniform(-0.3, 0.3, rows)
    eb = 1e-3
    codes, recon, escaped, n_escaped = _linear_quantize(values, last, second, w_last, w_second, eb, keep_recon=True)
    codes_again, no_recon, escaped_again, _ = _linear_quantize(values, last, second, w_last, w_second, eb, keep_recon=False)
    assert no_recon.size == 0 and np.array_equal(codes, codes_again) and np.array_equal(escaped, escaped_again)
    assert n_escaped == escaped.sum() and escaped[special].all()
    assert np.all(np.abs(codes) < RADIUS) and np.all(codes[escaped] == 0)
    kept = ~escaped
    assert np.all(np.abs(recon[kept].astype(np.float64) - values[kept].astype(np.float64)) <= eb)
    rebuilt = np.empty(n, dtype)
    dequantize(codes, _EMPTY32, 0.0, 0.0, _NO_SIGNS, last, second, w_last, w_second, row_length, _EMPTY32, 0.0, eb, rebuilt)
    assert np.array_equal(rebuilt[kept], recon[kept])


@pytest.mark.parametrize("factor_dtype", [np.int16, np.int32])
def test_offset_column_blocks_give_the_exact_product(factor_dtype):
    """4096 rows make blocks of 32 columns: 130 columns are five blocks, the last partial.
    Every element equals float32(step^2 x the exact integer sum)."""
    rng = np.random.default_rng(3)
    rank, rows, cols, step = 48, 4096, 130, 3.7e-4
    left = rng.integers(-32766, 32767, (rank, rows)).astype(factor_dtype)
    right = rng.integers(-32766, 32767, (rank, cols)).astype(factor_dtype)
    exact = left.astype(np.int64).T @ right.astype(np.int64)  # integers below 2^36
    expected = (exact.astype(np.float64) * (step * step)).astype(np.float32).reshape(-1)
    out = np.empty(rows * cols, np.float32)
    low_rank_offset(left, right, step, out)
    assert np.array_equal(out, expected)
    sums = Factors(left, right, step).offset_sums()  # (float64 here: these factors' sums reach 2^36)
    assert sums.dtype == np.float64 and np.array_equal(sums, exact.reshape(-1).astype(np.float64))


@pytest.mark.parametrize("largest", [2896, 2897, 32766])
def test_offset_sums_are_exact_in_either_precision(largest):
    """The sums are computed in float32 only where every partial sum stays below 2^24 (here
    rank 2 x largest^2: 2896 keeps it, 2897 does not): exact integers either way, and the
    offset the kernels build from them (offset_at) is low_rank_offset's, bit for bit."""
    rng = np.random.default_rng(largest)
    rank, rows, cols, step = 2, 300, 5000, 3.7e-4
    left = rng.integers(-largest, largest + 1, (rank, rows)).astype(np.int16)
    right = rng.integers(-largest, largest + 1, (rank, cols)).astype(np.int16)
    left[:, 0], right[:, 0] = largest, -largest  # the bound is reached: an exact sum of 2 x largest^2
    exact = (left.astype(np.int64).T @ right.astype(np.int64)).reshape(-1)
    factors = Factors(left, right, step)
    sums = factors.offset_sums()
    assert sums.dtype == (np.float32 if 2 * largest * largest < 1 << 24 else np.float64)
    assert np.array_equal(sums.astype(np.int64), exact)
    offset = np.empty(rows * cols, np.float32)
    low_rank_offset(left, right, step, offset)
    assert np.array_equal(offset, (exact.astype(np.float64) * (step * step)).astype(np.float32))
    codes = rng.integers(-5, 6, rows * cols).astype(np.int32)
    from_sums, from_values = np.empty(rows * cols, np.float32), np.empty(rows * cols, np.float32)
    none32 = np.empty(0, np.float32)
    for offset_arg, scale, out in ((sums, factors.offset_scale, from_sums), (offset, 1.0, from_values)):
        dequantize(codes, none32, 0.0, 0.0, _NO_SIGNS, none32, none32, np.empty(0), np.empty(0), 1, offset_arg, scale,
                   1e-3, out)
    np.testing.assert_array_equal(from_sums.view(np.uint32), from_values.view(np.uint32))


def _reference_levels(values, unit, rows, cols):
    """scale_levels by numpy: mean of the finite |x| x unit per row, per column and per tap
    (kernel position; none for two axes)."""
    magnitudes = np.abs(values.astype(np.float64)).reshape(rows, cols, -1) * unit
    finite = np.isfinite(magnitudes)
    magnitudes = np.where(finite, magnitudes, 0.0)

    def level(total, count):
        return quarter_octave_level(total / count) if count else ZERO_LEVEL

    def relative(total, count):
        lv = level(total, count)
        return ZERO_LEVEL if ZERO_LEVEL in (lv, mean_level) else lv - mean_level

    mean_level = level(magnitudes.sum(), finite.sum())
    row_levels = [level(magnitudes[i].sum(), finite[i].sum()) for i in range(rows)]
    col_levels = [relative(magnitudes[:, j].sum(), finite[:, j].sum()) for j in range(cols)]
    inner = magnitudes.shape[2]
    tap_levels = [relative(magnitudes[:, :, k].sum(), finite[:, :, k].sum()) for k in range(inner)] if inner > 1 else []
    return np.array(row_levels), np.array(col_levels), np.array(tap_levels, dtype=int)


@pytest.mark.parametrize("shape", [(37, 103), (16, 12, 3, 3), (5, 4), (8, 6, 5, 5)])
def test_scale_levels_match_a_plain_reference(shape):
    """The row sums run in four partial sums (an unrolled loop plus its tail when cols % 4 is
    not 0; kernels of 9 elements otherwise): levels as from plain means, NaN and Inf left out,
    an all-zero row at ZERO_LEVEL, and for a conv each tap's level too (an all-zero tap at
    ZERO_LEVEL, as on a 1 x 1 feature map); codes with unit 2 eb as their magnitudes with unit 1."""
    rng = np.random.default_rng(len(shape))
    rows, cols = shape[0], shape[1]
    inner = int(np.prod(shape[2:]))
    values = (rng.normal(size=shape) * rng.uniform(0.01, 10.0, (rows, 1) + (1,) * (len(shape) - 2))[:, :1]).astype(np.float32)
    if inner > 1:
        values *= rng.uniform(0.05, 20.0, shape[2:])  # taps of spread scales
        values.reshape(rows, cols, inner)[:, :, 2] = 0.0
    values = values.reshape(-1)
    values[rng.choice(values.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
    values.reshape(rows, -1)[1] = 0.0
    taps = inner if inner > 1 else 0
    row_levels, col_levels, tap_levels = np.empty(rows, np.int16), np.empty(cols, np.int16), np.empty(taps, np.int16)
    scale_levels(values, 1.0, rows, cols, row_levels, col_levels, tap_levels)
    expected_rows, expected_cols, expected_taps = _reference_levels(values, 1.0, rows, cols)
    assert row_levels[1] == ZERO_LEVEL
    # float sums in another order may cross a level boundary by one; the reference is exact otherwise
    assert np.abs(row_levels.astype(int) - expected_rows).max() <= 1 and np.mean(row_levels == expected_rows) > 0.9
    assert np.abs(col_levels.astype(int) - expected_cols).max() <= 1 and np.mean(col_levels == expected_cols) > 0.9
    assert tap_levels.size == expected_taps.size
    if taps:
        assert tap_levels[2] == ZERO_LEVEL
        assert np.abs(tap_levels.astype(int) - expected_taps).max() <= 1 and np.ptp(expected_taps[expected_taps != ZERO_LEVEL]) > 4
    codes = rng.integers(-300, 300, values.size).astype(np.int32)
    two_eb = 0.02
    from_codes = np.empty(rows, np.int16), np.empty(cols, np.int16), np.empty(taps, np.int16)
    from_magnitudes = np.empty(rows, np.int16), np.empty(cols, np.int16), np.empty(taps, np.int16)
    scale_levels(codes, two_eb, rows, cols, *from_codes)
    scale_levels(np.abs(codes) * two_eb, 1.0, rows, cols, *from_magnitudes)
    for got, expected in zip(from_codes, from_magnitudes):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("rows", [1, 7])
def test_linear_fit_sums_leave_out_non_finite_elements_like_a_plain_reference(rows):
    """The reassociated sums (ENCODER_SUMS) still skip every element where any of the three
    values is NaN or infinite, and equal float64 sums over the rest to rounding."""
    rng = np.random.default_rng(rows)
    n = rows * 1001
    values, last, second = (rng.normal(size=n).astype(np.float32) for _ in range(3))
    for array, at, bad in ((values, 3, np.nan), (last, 10, np.inf), (second, n // 2, -np.inf), (values, n - 1, np.inf)):
        array[at] = bad
    sums = np.zeros((rows, 5))
    linear_fit_sums(values, last, second, n // rows, sums)
    x, a, b = (v.astype(np.float64).reshape(rows, -1) for v in (values, last, second))
    finite = np.isfinite(x) & np.isfinite(a) & np.isfinite(b)
    x, a, b = (np.where(finite, v, 0.0) for v in (x, a, b))
    expected = np.stack([(a * a).sum(1), (a * b).sum(1), (b * b).sum(1), (a * x).sum(1), (b * x).sum(1)], axis=1)
    assert np.isfinite(sums).all()
    assert np.allclose(sums, expected, rtol=1e-12, atol=1e-9)


def _float16_casts(bits):
    """float16_bits and float16_as_float32_bits over uint32 float32 bits, in a kernel."""
    import numba

    from gradzip.floats import float16_as_float32_bits, float16_bits

    @numba.njit
    def casts(bits, narrowed, widened):
        for i in range(bits.size):
            narrowed[i] = float16_bits(bits[i])
            widened[i] = float16_as_float32_bits(narrowed[i])

    narrowed, widened = np.empty(bits.size, np.uint16), np.empty(bits.size, np.uint32)
    casts(bits, narrowed, widened)
    return narrowed, widened


def test_the_float16_casts_match_numpys():
    """The kernels' F16 rounding and widening give numpy's bits: every F16 value (NaNs
    included), float32 NaN payloads, rounding ties, carries into the exponent, subnormals,
    overflow and 2M random float32 values near F16's range (every float32 was checked once,
    2026-11-28: no mismatch)."""
    rng = np.random.default_rng(13)
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    nan_payloads = (rng.integers(0, 2, 100_000).astype(np.uint32) << 31) | np.uint32(0x7F800000) | rng.integers(
        1, 1 << 23, 100_000).astype(np.uint32)
    exponents = rng.integers(127 - 30, 127 + 20, 2_000_000).astype(np.uint32)
    random = (rng.integers(0, 2, exponents.size).astype(np.uint32) << 31) | (exponents << 23) | rng.integers(
        0, 1 << 23, exponents.size).astype(np.uint32)
    ties = []
    for exponent in range(127 - 26, 127 + 17):  # halfway cases: kept bits even and odd, normal and subnormal
        for upper in (0, 1, 2, 3, 0x3FE, 0x3FF):
            shift = 13 if exponent >= 127 - 14 else 13 + (127 - 14 - exponent)
            if shift > 24:
                continue
            mantissa = ((upper << shift) | (1 << (shift - 1))) & 0x7FFFFF
            for low in (0, 1):
                ties.append((exponent << 23) | mantissa | low)
    ties = np.array(ties, np.uint32)
    edges = np.array([0x7F800000, 0xFF800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x47800000, 0x00000001, 0x80000000,
                      0x33000000, 0x33000001, 0x337FFFFF, 0x387FE000, 0x387FF000, 0x38800000], np.uint32)
    bits = np.concatenate([every_half, nan_payloads, random, ties, ties | np.uint32(0x80000000), edges])
    narrowed, widened = _float16_casts(bits)
    with np.errstate(over="ignore", invalid="ignore"):
        expected = bits.view(np.float32).astype(np.float16)
    np.testing.assert_array_equal(narrowed, expected.view(np.uint16))
    np.testing.assert_array_equal(widened, expected.astype(np.float32).view(np.uint32))


def _numpy_round_trip(recon, dtype, gz):
    """widen(narrow(recon)) by numpy alone: the test's reference for the kernels' casts."""
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return recon.astype(np.float16).astype(np.float32)
    return (gz.bfloat16_from_float32(recon).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _numpy_narrow_bits(values, dtype, gz):
    """The F16 or BF16 bits of float32 values by numpy alone."""
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).view(np.uint16)
    return gz.bfloat16_from_float32(values).view(np.uint16)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_the_narrow_recheck_gives_what_numpys_casts_and_the_mask_give(gz, dtype):
    """The one-pass check after narrowing against numpy's casts and mask: the same
    reconstruction bits, codes and escapes, with values that round up to infinity,
    subnormals, NaN and Inf, near rounding ties and elements escaped before; a near miss
    keeps its code. (Its delta: the next test, whose reconstructions come from codes.)"""
    rng = np.random.default_rng(11 if dtype == "BF16" else 14)
    n = 6000
    halves = rng.integers(0, 1 << 16, n).astype(np.uint16)
    if dtype == "BF16":  # +Inf, -Inf, a NaN, a subnormal, the largest finite value
        halves[:5] = [0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x7F7F]
        values, scales, beyond = (halves.astype(np.uint32) << 16).view(np.float32), (1e-36, 1e-30, 1.0, 1e30, 3e38), (3.4e38, 3.39e38)
    else:
        halves[:5] = [0x7C00, 0xFC00, 0x7E01, 0x0001, 0x7BFF]
        values, scales, beyond = halves.view(np.float16).astype(np.float32), (1e-8, 1e-4, 1.0, 100.0), (65519.0, 65520.0)
    newly_escaped = kept = 0
    for scale in scales:
        with np.errstate(over="ignore", invalid="ignore"):
            recon = (values.astype(np.float64) + rng.uniform(-1.0, 1.0, n) * scale).astype(np.float32)
        recon[4:6] = beyond  # round to the largest value, or up to infinity
        with np.errstate(invalid="ignore"):
            recon[6::97] = values[6::97] + np.float32(2.0 ** -20) * np.sign(values[6::97])  # near rounding ties
        escaped = ~np.isfinite(values) | (rng.random(n) < 0.05)
        recon[escaped] = values[escaped]
        codes = rng.integers(-50, 50, n).astype(np.int32)
        bound = max(scale, 1e-45)
        expected_recon = _numpy_round_trip(recon, dtype, gz)
        expected_recon[escaped] = values[escaped]
        with np.errstate(over="ignore", invalid="ignore"):
            over = ~(np.abs(values.astype(np.float64) - expected_recon.astype(np.float64)) <= bound) & ~escaped
        expected_codes, expected_escaped = codes.copy(), escaped | over
        expected_recon[over] = values[over]
        deltas = np.zeros(n, np.uint16)
        added, escaped_before = recheck_narrowed(values, bound, recon, escaped, deltas, dtype == "F16")
        assert added == int(over.sum()) and escaped_before == int((expected_escaped & ~over).sum())
        np.testing.assert_array_equal(recon.view(np.uint32), expected_recon.view(np.uint32))
        np.testing.assert_array_equal(codes, expected_codes)  # a near miss keeps its code
        np.testing.assert_array_equal(escaped, expected_escaped)
        newly_escaped += added
        kept += int((~escaped).sum())
    assert newly_escaped > 0 and kept > 0


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
@pytest.mark.parametrize("predictor", ["linear", "linear rows with offset", "offset", "ema", "none"])
@pytest.mark.parametrize("special", [True, False])
def test_the_recheck_rebuilds_an_escaped_element_as_dequantize_does(gz, dtype, predictor, special):
    """The narrow recheck's deltas, patched back into what dequantize rebuilds from the codes
    under every kind of prediction, give each escaped element's bits: near misses (which keep
    their codes), and with NaN and -0.0 (special: escaped by quantize; any code here) every
    escaped element's, taken again by escaped_deltas."""
    rng = np.random.default_rng(5)
    rows, row_length = 8, 300
    n = rows * row_length
    unit = 0.05 if dtype == "BF16" else 3.0  # the largest values' narrow spacing near eb: near misses
    values = _numpy_round_trip(rng.standard_normal(n).astype(np.float32) * unit, dtype, gz)
    if special:
        values[::211] = np.nan
        values[::307] = -0.0
    last = rng.standard_normal(n).astype(np.float32) * unit
    second = rng.standard_normal(n).astype(np.float32) * unit
    no_state, no_weights = np.empty(0, np.float32), np.empty(0, np.float64)
    ema, mean, std, signs = no_state, 0.0, 0.0, np.empty(0, np.int8)
    w_last, w_second, length, offset, kept_last, kept_second = no_weights, no_weights, 1, no_state, no_state, no_state
    if predictor.startswith("linear"):
        kept_last, kept_second = last, second
        by_rows = "rows" in predictor
        w_last = rng.uniform(0.2, 0.9, rows if by_rows else 1)
        w_second = rng.uniform(-0.3, 0.3, rows if by_rows else 1)
        length = row_length if by_rows else n
    if "offset" in predictor:
        offset = (rng.standard_normal(n) * unit / 5).astype(np.float32)
    if predictor == "ema":
        ema, mean, std = np.abs(last), unit / 50, 0.9
        signs = np.where(second < 0, -1, 1).astype(np.int8)
    nan_prediction = special and predictor != "none"
    if nan_prediction:  # element 5's prediction NaN: inf - inf from a state holding infinities
        if predictor.startswith("linear"):
            kept_last[5], kept_second[5] = np.inf, -np.inf if w_second[0] > 0 else np.inf
        elif predictor == "offset":
            offset[5] = np.nan
        else:
            ema[5] = np.nan
    args = (ema, mean, std, signs, kept_last, kept_second, w_last, w_second, length, offset, 1.0)  # (offset: values)
    eb = 4e-3
    codes, recon, escaped = np.empty(n, np.int32), np.empty(n, np.float32), np.empty(n, np.bool_)
    special_count = int((np.isnan(values) | ((values == 0) & np.signbit(values))).sum()) + nan_prediction
    assert quantize(values, *args, eb, codes, recon, escaped, np.inf) == special_count
    assert special_count == (19 + (predictor != "none") if special else 0)
    deltas = np.zeros(n, np.uint16)
    codes[escaped] = rng.integers(-9, 10, int(escaped.sum()))  # any code: its delta is taken from it
    added, escaped_before = recheck_narrowed(values, eb, recon, escaped, deltas, dtype == "F16")
    assert escaped_before == special_count
    if special:  # (as codec._rechecked)
        escaped_deltas(values, *args, eb, codes, recon, escaped, deltas, dtype == "F16")
    rebuilt = np.empty(n, np.float32)
    dequantize(codes, *args, eb, rebuilt)
    index = np.flatnonzero(escaped)
    assert added > 0 and index.size == added + special_count
    assert np.count_nonzero(codes[index]) > added // 2  # near misses keep their codes
    # where the decoder's value is NaN the delta is from 0: the value's own bits (a NaN made
    # by arithmetic has the sign the hardware gives it)
    nan_rebuilt = index[np.isnan(rebuilt[index])]
    assert nan_rebuilt.size == nan_prediction
    np.testing.assert_array_equal(deltas[nan_rebuilt], _numpy_narrow_bits(values[nan_rebuilt], dtype, gz))
    patch_escape_deltas(rebuilt, index, deltas[index], dtype == "F16")
    # the decoder's narrowed values: the encoder's reconstruction, the value where escaped
    np.testing.assert_array_equal(_numpy_narrow_bits(rebuilt, dtype, gz), _numpy_narrow_bits(recon, dtype, gz))
    np.testing.assert_array_equal(_numpy_narrow_bits(rebuilt[index], dtype, gz), _numpy_narrow_bits(values[index], dtype, gz))
    finite = np.isfinite(values)
    assert np.all(np.abs(recon[finite].astype(np.float64) - values[finite]) <= eb) and np.isnan(recon[~finite]).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", ["normal", "nan", "inf", "zeros", "zero_min", "negative_zero_max", "all_nan", "small"])
def test_value_range_gives_what_the_kernel_gives(dtype, case):
    """numpy's min and max stand in for finite_range only where they give the same bits:
    non-finite elements and a zero min or max (which zero?) go to the kernel."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=20000).astype(dtype)
    if case == "nan":
        values[5] = np.nan
    elif case == "inf":
        values[7] = -np.inf
    elif case == "zeros":
        values[:] = 0.0
        values[3] = -0.0
    elif case == "zero_min":
        values = np.abs(values)
        values[9] = -0.0
    elif case == "negative_zero_max":
        values = -np.abs(values)
        values[9] = 0.0
        values[10] = -0.0
    elif case == "all_nan":
        values[:] = np.nan
    elif case == "small":
        values = values[:100]
    fast, kernel = value_range(values), finite_range(values)
    assert fast[0] == kernel[0]
    assert np.float64(fast[1]).tobytes() == np.float64(kernel[1]).tobytes()
    assert np.float64(fast[2]).tobytes() == np.float64(kernel[2]).tobytes()


@pytest.mark.parametrize("shape", [(12, 40), (6, 5, 3, 3)])
@pytest.mark.parametrize("with_ema", [True, False])
def test_scale_fit_sums_match_an_element_by_element_reference(shape, with_ema):
    """The kernel's branch-free loops add an undefined level with weight 0: the sums must be
    those of skipping it (zero and non-finite values, zero rows, columns and taps, inf EMA);
    a conv's S includes its tap's level."""
    rng = np.random.default_rng(12)
    values = rng.laplace(0, 1e-3, int(np.prod(shape))).astype(np.float32)
    values[::17], values[3], values[8] = 0.0, np.nan, np.inf
    ema = rng.normal(size=values.size).astype(np.float32) if with_ema else np.empty(0, np.float32)
    if with_ema:
        ema[::23] = np.inf
    rows, cols = shape[0], shape[1]
    inner = values.size // (rows * cols)
    row_levels = rng.integers(-40, 10, rows).astype(np.int16)
    col_levels = rng.integers(-8, 8, cols).astype(np.int16)
    tap_levels = rng.integers(-8, 8, inner if inner > 1 else 0).astype(np.int16)
    row_levels[2], col_levels[1] = ZERO_LEVEL, ZERO_LEVEL
    if inner > 1:
        tap_levels[4] = ZERO_LEVEL
    eb, mean, std, unit = 1e-4, 1e-3, 5e-4, 1.0
    got = np.zeros(9)
    scale_fit_sums(values, unit, row_levels, col_levels, tap_levels, eb, ema, mean, std, got)
    expected = [0] * 9
    step_level, inv_step = quarter_octave_level(2.0 * eb), 1.0 / (2.0 * eb)
    for k in range(values.size):
        i, j = k // (cols * inner), (k // inner) % cols
        tap = int(tap_levels[k % inner]) if inner > 1 else 0
        t = quarter_octave_level(abs(float(values[k])) * unit * inv_step)
        p = quarter_octave_level(abs(float(ema[k]) * std + mean) * inv_step) if with_ema else 0
        if ZERO_LEVEL in (row_levels[i], col_levels[j], tap, t, p):
            continue
        s = int(row_levels[i]) + int(col_levels[j]) + tap - step_level
        for slot, term in enumerate((1, s, p, t, s * s, p * p, s * p, s * t, p * t)):
            expected[slot] += term
    assert expected[0] > 0 and got.tolist() == [float(v) for v in expected]


def test_folding_a_round_in_place_gives_what_it_gives_out_of_place():
    rng = np.random.default_rng(9)
    ema = rng.normal(size=1000).astype(np.float32)
    recon = rng.normal(size=1000).astype(np.float32)
    in_place = ema.copy()
    fold_round(in_place, recon, 0.6, False, in_place, np.empty(1000, np.int8), np.empty(1000, np.float32))
    before = ema.copy()
    out = np.empty_like(ema)
    fold_round(ema, recon, 0.6, False, out, np.empty(1000, np.int8), np.empty(1000, np.float32))
    assert np.array_equal(ema, before) and np.array_equal(out, in_place)


@pytest.mark.parametrize("case", ["normal", "odd_length", "constant_magnitude", "tiny_spread", "non_finite", "huge",
                                  "tiny"])
def test_magnitude_statistics_match_numpy(case):
    """The one-pass statistics (and the two passes they fall back to where the variance
    cancels or a sum is not finite) against numpy's mean and standard deviation of the finite
    magnitudes. A constant magnitude must give a spread of exactly 0 (z = 0), not a rounding
    residue that the EMA would amplify."""
    rng = np.random.default_rng(12)
    values = rng.normal(size=4003) * 1e-3
    if case == "odd_length":
        values = values[:7]
    elif case == "constant_magnitude":
        values = np.where(values > 0, 0.25, -0.25)
    elif case == "tiny_spread":
        values = 1.0 + rng.normal(size=4003) * 1e-9
    elif case == "non_finite":
        values[[0, 10, 4002]] = [np.nan, np.inf, -np.inf]
    elif case == "huge":
        values = 1e155 * (1.0 + values)  # squares overflow; deviations from the mean do not
    elif case == "tiny":
        values = values * 1e-157  # squares in float64's subnormals
    finite = np.abs(values[np.isfinite(values)])
    for dtype in (np.float64, np.float32):
        if case in ("huge", "tiny") and dtype == np.float32:
            continue
        mean, std = magnitude_stats(values.astype(dtype))
        reference = finite.astype(dtype).astype(np.float64)
        assert mean == pytest.approx(reference.mean(), rel=1e-12, abs=0), dtype
        if case == "constant_magnitude":
            assert std == 0.0
        else:
            assert std == pytest.approx(reference.std(), rel=1e-9, abs=0), dtype


@pytest.mark.parametrize("first_round", [True, False])
def test_folding_a_round_in_matches_a_numpy_reference(first_round):
    """The EMA of normalized magnitudes (non-finite values count as z = 0, and all count as 0
    where the statistics overflow), the signs (NaN as 0) and the float32 cast (an F64 value
    beyond float32 becomes inf, NaN stays NaN), in one pass, bit for bit against the formulas
    spelled out in numpy."""
    rng = np.random.default_rng(11)
    ema = rng.normal(size=1001).astype(np.float32)
    recon = rng.normal(size=1001)
    recon[[3, 4, 5, 6, 7]] = [1e300, -1e300, np.nan, 0.0, -0.0]
    if not first_round:
        recon[[3, 4]] = [1e39, -1e39]  # beyond float32, but statistics that do not overflow
    mean, std = magnitude_stats(recon)
    if not (np.isfinite(mean) and np.isfinite(std)):
        mean, inv_std = 0.0, 0.0
    else:
        inv_std = 1.0 / std if std > 0 else 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        z = np.where(np.isfinite(recon), (np.abs(recon) - mean) * inv_std, 0.0)
        expected_ema = (z if first_round else (1.0 - 0.6) * ema.astype(np.float64) + 0.6 * z).astype(np.float32)
        expected_last = recon.astype(np.float32)
    expected_sign = np.where(recon > 0, 1, np.where(recon < 0, -1, 0)).astype(np.int8)
    got = np.empty_like(ema), np.empty(recon.size, np.int8), np.empty_like(ema)
    fold_round(ema, recon, 0.6, first_round, *got)
    for a, b in zip(got, (expected_ema, expected_sign, expected_last)):
        assert a.tobytes() == b.tobytes()


def test_advancing_a_state_leaves_the_previous_one_untouched():
    rng = np.random.default_rng(10)
    previous = TensorState((20, 50), "F32", 2, rng.normal(size=1000).astype(np.float32),
                           np.sign(rng.normal(size=1000)).astype(np.int8), rng.normal(size=1000).astype(np.float32),
                           rng.normal(size=1000).astype(np.float32))
    copies = [a.copy() for a in (previous.ema, previous.sign, previous.last, previous.second_last)]
    after = advance_state(previous, (20, 50), "F32", rng.normal(size=1000).astype(np.float32), CodecConfig(1e-3, "abs"), 0)
    assert all(np.array_equal(a, b) for a, b in zip(copies, (previous.ema, previous.sign, previous.last, previous.second_last)))
    assert after.rounds == 3 and after.second_last is previous.last and not np.array_equal(after.ema, previous.ema)


def test_cached_dtype_names_tell_bfloat16_from_uint16_in_either_order():
    """dtypes compare and hash without their metadata, so the cache must not map one to the other."""
    bf16, u16 = as_bfloat16(np.zeros(3, np.uint16)), np.zeros(3, np.uint16)
    assert [dtype_name(bf16), dtype_name(u16), dtype_name(bf16)] == ["BF16", "U16", "BF16"]
    assert dtype_name(np.zeros(2, ">f4")) == "F32"


# ----------------------------------------------------------------------------- element ranges on threads


@pytest.mark.parametrize("n, threads, align", [(1 << 19, 2, 1), (600_000, 3, 1000), (100, 4, 1), (3 * (1 << 17) + 5, 8, 7)])
def test_spans_cover_the_elements_in_aligned_ranges(n, threads, align):
    from gradzip.parallel import MIN_SPAN, spans

    ranges = spans(n, threads, align)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a == b for (_, a), (b, _) in zip(ranges, ranges[1:]))
    assert all(start % align == 0 for start, _ in ranges)
    assert 1 <= len(ranges) <= max(1, min(threads, n // MIN_SPAN))


@pytest.mark.parametrize("rows", [2, 333])
def test_linear_fit_sums_on_threads_give_the_same_bits(rows):
    from gradzip.predict.linear import linear_fit_sums_on

    rng = np.random.default_rng(rows)
    n = rows * (600_000 // rows)
    values, last, second = (rng.laplace(size=n).astype(np.float32) for _ in range(3))
    last[::1001] = np.nan
    outputs = []
    for threads in (1, 2, 3):
        sums = np.zeros((rows, 5))
        linear_fit_sums_on(values, last, second, n // rows, sums, threads)
        outputs.append(sums)
    assert np.isfinite(outputs[0]).all()
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0].view(np.uint64), other.view(np.uint64))


@pytest.mark.parametrize("shape", [(700, 1000), (96, 400, 3, 3)])
@pytest.mark.parametrize("with_ema", [True, False])
@pytest.mark.parametrize("row_step", [1, 3])
def test_scale_fit_sums_on_threads_give_the_same_sums(shape, with_ema, row_step):
    """Any thread count sums the same rows (every row_step-th from row 0, the ranges' starts
    aligned to them), and those are the rows a plain loop over the sampled rows sums."""
    from gradzip.predict.context import scale_fit_sums, scale_fit_sums_on

    rng = np.random.default_rng(len(shape))
    values = (rng.normal(size=shape) * rng.uniform(0.01, 10.0, (shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
    values = values.reshape(-1)
    rows, cols = shape[0], shape[1]
    taps = int(np.prod(shape[2:])) if len(shape) > 2 else 0
    row_levels, col_levels, tap_levels = np.empty(rows, np.int16), np.empty(cols, np.int16), np.empty(taps, np.int16)
    scale_levels(values, 1.0, rows, cols, row_levels, col_levels, tap_levels)
    row_levels[3] = ZERO_LEVEL
    ema = rng.normal(size=values.size).astype(np.float32) if with_ema else np.empty(0, np.float32)
    outputs = []
    for threads in (1, 2, 3):
        sums = np.zeros(9)
        scale_fit_sums_on(values, 1.0, row_levels, col_levels, tap_levels, 1e-3, ema, 0.5, 0.25, sums, threads,
                          row_step=row_step)
        outputs.append(sums)
    assert outputs[0][0] > 0
    for other in outputs[1:]:
        np.testing.assert_array_equal(outputs[0], other)
    row_size = values.size // rows
    reference = np.zeros(9)
    for row in range(0, rows, row_step):  # each sampled row alone
        scale_fit_sums(values[row * row_size:(row + 1) * row_size], 1.0, row_levels[row:row + 1], col_levels, tap_levels,
                       1e-3, ema[row * row_size:(row + 1) * row_size] if ema.size else ema, 0.5, 0.25, reference)
    np.testing.assert_array_equal(outputs[0], reference)


@pytest.mark.parametrize("first_round", [True, False])
def test_folding_a_large_round_on_threads_gives_the_same_bits(first_round):
    from gradzip.predict.history import fold_round_on

    rng = np.random.default_rng(4)
    n = 600_001
    recon = (rng.laplace(size=n) * 1e-3).astype(np.float32)
    recon[::997] = 0.0
    ema = rng.normal(size=n).astype(np.float32)
    outputs = []
    for threads in (1, 2, 3):
        out = (np.empty(n, np.float32), np.empty(n, np.int8), np.empty(n, np.float32))
        fold_round_on(ema, recon, 0.6, first_round, *out, threads=threads)
        outputs.append(out)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("kind", ["none", "ema", "offset", "linear", "linear_rows", "linear_rows_offset"])
def test_dequantizing_a_large_tensor_on_threads_gives_the_same_bits(kind):
    """Ranges of a per-row linear prediction hold whole rows (601 rows of 1000 elements: an
    even split on 3 threads would cut rows); the other predictions split anywhere."""
    from gradzip.codec import _dequantized

    rng = np.random.default_rng(11)
    rows, row_length = 601, 1000
    n = rows * row_length
    codes = rng.integers(-50, 50, size=n).astype(np.int32)
    none32, none8 = np.empty(0, np.float32), np.empty(0, np.int8)
    ema, signs = rng.normal(size=n).astype(np.float32), rng.choice([-1, 1], size=n).astype(np.int8)
    last, second = rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)
    offset = (rng.normal(size=n) * 0.1).astype(np.float32)
    w = np.ones(1)
    row_w = rng.normal(size=rows)
    args = {
        "none": (none32, 0.0, 0.0, none8, none32, none32, np.empty(0), np.empty(0), 1, none32, 0.0),
        "ema": (ema, 0.5, 0.2, signs, none32, none32, np.empty(0), np.empty(0), 1, none32, 0.0),
        "offset": (none32, 0.0, 0.0, none8, none32, none32, np.empty(0), np.empty(0), 1, offset, 1.0),
        "linear": (none32, 0.0, 0.0, none8, last, second, 0.7 * w, -0.2 * w, n, none32, 0.0),
        "linear_rows": (none32, 0.0, 0.0, none8, last, second, row_w, -0.5 * row_w, row_length, none32, 0.0),
        "linear_rows_offset": (none32, 0.0, 0.0, none8, last, second, row_w, -0.5 * row_w, row_length, offset, 1.0),
    }[kind]
    reference = np.empty(n, np.float32)
    dequantize(codes, *args, 1e-3, reference)

    class GivenArguments:  # a prediction whose kernel arguments (a ready offset among them) are given
        low_rank = None

        def kernel_args(self, threads=1, offset=None):
            return args

    for threads in (2, 3):
        recon = np.empty(n, np.float32)
        _dequantized(codes, GivenArguments(), 1e-3, recon, threads)
        np.testing.assert_array_equal(recon.view(np.uint32), reference.view(np.uint32))


def test_the_offset_on_threads_gives_the_same_bits():
    rng = np.random.default_rng(2)
    left = rng.integers(-30000, 30000, size=(40, 300)).astype(np.int16)
    right = rng.integers(-30000, 30000, size=(40, 5000)).astype(np.int16)
    one, two = np.empty(300 * 5000, np.float32), np.empty(300 * 5000, np.float32)
    low_rank_offset(left, right, 3e-7, one, 1)
    low_rank_offset(left, right, 3e-7, two, 2)
    np.testing.assert_array_equal(one.view(np.uint32), two.view(np.uint32))


def test_the_kernel_cache_stamp_covers_every_kernel_module():
    from gradzip.kernel_cache import KERNEL_MODULES, PACKAGE

    defining = {str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py") if "njit" in path.read_text()}
    assert defining == set(KERNEL_MODULES)


def test_cached_kernels_are_dropped_when_any_kernel_source_changes(tmp_path, monkeypatch):
    """numba recompiles a cached kernel only when its own file changes, not a file whose
    kernel it inlines: so any kernel file's change drops all of the package's cached kernels."""
    import os

    from gradzip.kernel_cache import KERNEL_MODULES, STAMP_NAME, drop_stale_kernels

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    package = tmp_path / "pkg"
    for name in KERNEL_MODULES:
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text("# kernels\n")
    cached = package / "predict" / "__pycache__" / "history.fold_round-16.py311.nbi"

    def cache_kernels():
        cached.parent.mkdir(exist_ok=True)
        cached.write_bytes(b"index")

    cache_kernels()
    assert drop_stale_kernels(package) and not cached.exists()  # never stamped
    assert (package / "__pycache__" / STAMP_NAME).is_file()
    cache_kernels()
    assert not drop_stale_kernels(package) and cached.exists()  # unchanged sources keep it
    magnitude = package / "predict" / "magnitude.py"
    os.utime(magnitude, ns=(magnitude.stat().st_atime_ns, magnitude.stat().st_mtime_ns + 10**9))
    assert drop_stale_kernels(package) and not cached.exists()  # another file's kernel changed
    cache_kernels()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    (package / "quantize.py").write_text("# kernels, edited\n")
    assert not drop_stale_kernels(package) and cached.exists()  # numba's rules there


def test_a_large_bfloat16_tensor_gives_the_same_stream_on_any_thread_count(gz):
    """A BF16 tensor large enough to quantize in element ranges re-checks its bound after
    narrowing in those ranges: the same streams and states on 1, 2 and 3 threads."""
    import gradzip

    rng = np.random.default_rng(12)
    base = rng.standard_normal((600, 500)).astype(np.float32)
    rounds = []
    for _ in range(3):
        values = base * np.float32(0.7) + rng.standard_normal(base.shape).astype(np.float32)
        values.reshape(-1)[rng.choice(values.size, 3, replace=False)] = [np.nan, np.inf, -np.inf]
        rounds.append({"w": gz.bfloat16_from_float32(values)})
    outputs = []
    for threads in (1, 2, 3):
        compressor = gradzip.Compressor(1e-3, threads=threads)
        outputs.append([(compressor.compress(tensors), compressor.state.to_bytes()) for tensors in rounds])
    assert outputs[0] == outputs[1] == outputs[2]
    assert compressor.last_report.tensors[0].escaped > 1000  # the re-check escaped values
    decompressor = gradzip.Decompressor(threads=2)
    for (blob, _), tensors in zip(outputs[0], rounds):
        gz.assert_within_bound(tensors["w"], decompressor.decompress(blob)["w"], 1e-3, "rel")


@pytest.mark.parametrize("n, threads", [(9216, 1), (1 << 18, 1), (1 << 18, 2)])
def test_a_fold_with_no_last_array_gives_the_same_ema_and_signs(n, threads):
    """Where the reconstruction is the new state's last array the fold gets an empty
    last_out and writes nothing there: its EMA and signs are those of a fold that copies it
    (one call, and element ranges on two threads), and the reconstruction is untouched."""
    from gradzip.predict.history import fold_round_on

    rng = np.random.default_rng(31)
    ema = rng.random(n).astype(np.float32)
    recon = (rng.standard_normal(n) * 0.01).astype(np.float32)
    recon[::97] = 0.0
    recon[5], recon[6] = np.inf, np.nan
    outputs = []
    for last_out in (np.empty(n, np.float32), np.empty(0, np.float32)):
        ema_out, sign_out, before = np.empty(n, np.float32), np.empty(n, np.int8), recon.copy()
        fold_round_on(ema, recon, 0.6, False, ema_out, sign_out, last_out, threads)
        assert recon.tobytes() == before.tobytes()
        outputs.append((ema_out.tobytes(), sign_out.tobytes(), last_out))
    assert outputs[0][:2] == outputs[1][:2]
    assert outputs[0][2].tobytes() == recon.tobytes()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", [(12, 37), (6, 5, 3, 3)])
def test_scale_contexts_follow_the_element_by_element_definition(shape, with_state):
    """Each element's context is _fitted_bucket of its row, column and tap terms and its
    predicted level: the flat row loops of a linear layer (with and without a state) and the
    kernel loop of a conv layer give what a plain element-by-element loop gives, with rows,
    columns and a tap at ZERO_LEVEL among them."""
    from gradzip.predict import context

    rng = np.random.default_rng(7 + len(shape) + with_state)
    rows, cols = shape[0], shape[1]
    inner = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    row_levels = rng.integers(-60, 60, rows).astype(np.int16)
    col_levels = rng.integers(-60, 60, cols).astype(np.int16)
    tap_levels = rng.integers(-20, 20, inner if inner > 1 else 0).astype(np.int16)
    row_levels[2], col_levels[3] = ZERO_LEVEL, ZERO_LEVEL
    if inner > 1:
        tap_levels[5] = ZERO_LEVEL
    n = rows * cols * inner
    ema = rng.random(n).astype(np.float32) if with_state else np.empty(0, np.float32)
    eb, mean, std, w_scale, w_ema, offset = 1e-3, 0.2, 0.7, 21, 9 if with_state else 0, -37
    contexts = np.zeros(n, np.uint8)
    context.scale_contexts(row_levels, col_levels, tap_levels, eb, ema, mean, std, w_scale, w_ema, offset, contexts)
    step_level = context.quarter_octave_level(2.0 * eb)
    expected = np.zeros(n, np.uint8)
    for i in range(rows):
        if row_levels[i] == ZERO_LEVEL:
            expected[i * cols * inner : (i + 1) * cols * inner] = context.ZERO_SCALE_BUCKET
            continue
        for j in range(cols):
            column = context._ZERO_TERM if col_levels[j] == ZERO_LEVEL else w_scale * int(col_levels[j])
            term = w_scale * (int(row_levels[i]) - step_level) + offset + column
            for k in range(inner):
                at = (i * cols + j) * inner + k
                tap = 0 if inner == 1 else context._ZERO_TERM if tap_levels[k] == ZERO_LEVEL else w_scale * int(tap_levels[k])
                predicted = np.int64(0)
                if with_state:
                    predicted = context.quarter_octave_level(
                        context._predicted_magnitude(ema, mean, std, np.uint64(at)) * (1.0 / (2.0 * eb)))
                expected[at] = context._fitted_bucket(np.int64(term + tap), predicted, np.int64(w_ema))
    assert np.array_equal(contexts, expected)
    assert len(set(expected.tolist())) > 3  # (the case spreads over buckets)
    zero_part = np.zeros((rows, cols, inner), bool)  # elements of a zero row, column or tap, and only they
    zero_part[2], zero_part[:, 3] = True, True
    if inner > 1:
        zero_part[:, :, 5] = True
    assert np.array_equal(contexts == context.ZERO_SCALE_BUCKET, zero_part.reshape(-1))


@pytest.mark.parametrize("n_kernels, size", [(1, 9), (7, 25), (8, 9), (9, 1), (512, 9), (1000, 3)])
def test_signs_from_a_kernel_bitmap_match_numpys_unpacking(n_kernels, size):
    """The decoder's bitmap kernel gives predicted_signs of the flags numpy unpacks from the
    encoder's packing, for every oscillation mode, and refuses a bitmap of the wrong length."""
    from gradzip.predict.sign import predicted_signs, signs_from_bitmap

    rng = np.random.default_rng(n_kernels * 31 + size)
    previous = rng.choice(np.array([-1, 0, 1], np.int8), n_kernels * size)
    for share in (0.0, 0.3, 1.0):
        predictable = rng.random(n_kernels) < share
        kernel_sign = rng.random(n_kernels) < 0.5
        bitmap = np.frombuffer(np.packbits(predictable).tobytes() + np.packbits(kernel_sign[predictable]).tobytes(),
                               np.uint8)
        for oscillation in (0, 1, 2):
            expected = np.empty(previous.size, np.int8)
            predicted_signs(previous, oscillation, size, predictable, kernel_sign & predictable, expected)
            out = np.full(previous.size, 7, np.int8)
            assert signs_from_bitmap(previous, oscillation, size, bitmap, out)
            np.testing.assert_array_equal(out, expected)
        for wrong in (bitmap[:-1], np.concatenate([bitmap, np.zeros(1, np.uint8)])):
            assert not signs_from_bitmap(previous, 0, size, wrong, np.empty(previous.size, np.int8))


def test_the_scale_fit_samples_about_2_18_elements_and_at_least_8_rows():
    from gradzip.codec import _scale_fit_row_step

    assert _scale_fit_row_step(256 * 4096, 256) == 4  # cnn5fc's FC layer: 64 rows
    assert _scale_fit_row_step(512 * 4608, 512) == 9  # a ResNet's 512 x 512 x 3 x 3 conv: 57 rows
    assert _scale_fit_row_step(16 * 65536, 16) == 2  # few long rows: still 8 of them
    assert _scale_fit_row_step(1 << 18, 4096) == 1 and _scale_fit_row_step(1 << 20, 4) == 1


def test_the_float32_cast_of_the_bundle_matches_numpys_bit_for_bit():
    """floats.as_float32 (the bundle's cast of its float64 values) gives numpy's astype bits:
    ties to even, subnormals, overflow to inf, infinities, NaN and signed zeros."""
    from gradzip.floats import as_float32
    rng = np.random.default_rng(5)
    f32_max = float(np.finfo(np.float32).max)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, f32_max, -f32_max, f32_max * (1 + 2 ** -25), f32_max * 1.0000001,
               1e39, -1e300, 1e-46, -1e-45, 1.401298464324817e-45, 7e-46, 1 + 2 ** -24, 1 + 3 * 2 ** -24]
    values = np.concatenate([np.array(special), rng.normal(0, 1, 5000), rng.normal(0, 1, 2000) * 1e-40,
                             rng.normal(0, 1, 2000) * 1e38, (rng.normal(0, 1, 2000) * 2 ** 30).round() * 2 ** -24])
    with np.errstate(over="ignore"):
        expected = values.astype(np.float32)
    np.testing.assert_array_equal(as_float32(values).view(np.uint32), expected.view(np.uint32))


def test_the_cli_can_tell_a_first_run_that_compiles_the_kernels(tmp_path):
    """kernel_cache.first_call_compiles (the CLI's progress bar says so on a first run): True
    with an empty numba cache, False once the kernel has been compiled and cached."""
    import os
    import subprocess
    import sys

    from gradzip.entropy import rans
    from gradzip.kernel_cache import compiled_before, first_call_compiles

    probe = "from gradzip.kernel_cache import first_call_compiles as f; print(f('encode'), f('decode'))"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "empty-cache")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    blob = rans.encode(np.arange(-5, 5, dtype=np.int32), None, 1)  # (compiles and caches, where not yet)
    assert np.array_equal(rans.decode(blob, np.zeros(10, np.uint8), 1), np.arange(-5, 5))
    assert compiled_before(rans._encode_kernel) and compiled_before(rans.decode_stream_kernel)
    assert not first_call_compiles("encode") and not first_call_compiles("decode")
