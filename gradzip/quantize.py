"""Linear quantization of prediction residuals with a guaranteed pointwise bound.

q = round((x - p) / (2 eb)), x' = p + 2 eb q. An element is *escaped* (stored exactly) when
|q| would reach RADIUS, when x or the residual is not finite, when x is -0.0 (so signed zeros
survive), or when x', after the cast back to the tensor's dtype, is further than eb from x in
exact arithmetic (`exceeds`; an F16 or BF16 element that escapes only there keeps its code,
and the stream stores its value as a difference from the decoder's narrowed x'). Encoder and
decoder both reconstruct with `_reconstruct`, so they agree bit for bit (no fastmath anywhere
here).
"""
from __future__ import annotations

import math

import numba
import numpy as np

from .floats import narrowed_bits, widened_bits

# Codes live in (-RADIUS, RADIUS); larger residuals are escaped. 2**15 as in SZ3.
RADIUS = 1 << 15
_BLOCK = 4096  # elements of a linear row quantized at a time (see quantize)


@numba.njit(cache=True, nogil=True, inline="always")
def _reconstruct(p, two_eb, q):
    return p + two_eb * q


@numba.njit(cache=True, nogil=True, inline="always")
def linear_at(w_last, w_second, last_value, second_value):
    # Scalars only: the one spelling of the linear prediction, shared by both kernels.
    return w_last * np.float64(last_value) + w_second * np.float64(second_value)


@numba.njit(cache=True, nogil=True, inline="always")
def _ema_shift_at(ema, mean, std, signs, i):
    return abs(np.float64(ema[i]) * std + mean) * np.float64(signs[i])


@numba.njit(cache=True, nogil=True, inline="always")
def offset_at(offset, i, offset_scale):
    """Element i of the low-rank offset, float32(step**2 x its exact integer sum), as float64:
    offset holds the sums (lowrank.low_rank_sums) and offset_scale is step**2, so the scaling
    and rounding that lowrank.low_rank_offset does in a pass of its own happen here."""
    return np.float64(np.float32(np.float64(offset[i]) * offset_scale))


@numba.njit(cache=True, nogil=True, inline="always")
def exceeds(x, r, bound):
    """Whether |x - r| > bound in exact arithmetic, for float64 x and r (True where the
    difference is NaN or infinite). x - r rounds where the two lie far apart in exponent
    (-1e-20 - 0.5 gives -0.5), so a difference just above bound can round onto it (rounding
    is monotone: one that rounds below bound is within it, one that rounds above is not).
    Where it lands on bound, the subtraction's exact remainder decides (TwoSum: x - r is
    exactly d + remainder in float64's round-to-nearest)."""
    d = x - r
    magnitude = abs(d)
    if magnitude != bound:
        return not magnitude < bound
    from_x = d - x
    remainder = (x - (d - from_x)) + (-r - from_x)
    return remainder != 0.0 and (remainder < 0.0) == (d < 0.0)


@numba.njit(cache=True, nogil=True, inline="always")
def _code_and_recon(x, p, bound, two_eb, recon_type):
    """(code, reconstruction, True, False) for x against prediction p, or (0, any, False, tie)
    when x must be escaped: when the reconstruction may be further than bound from x (tie:
    its float64 difference is bound exactly), or x is not representable. Branch-free
    (selects, not jumps), so the loops around it vectorize: 1.5x faster on a 768 x 3072
    layer. abs(scaled) < ... is False for NaN and Inf."""
    scaled = (x - p) / two_eb
    not_negative_zero = (x != 0.0) | (math.copysign(1.0, x) > 0.0)
    representable = (abs(scaled) < RADIUS - 1) & not_negative_zero
    q = math.floor(scaled + 0.5) if representable else 0.0
    r = recon_type(_reconstruct(p, two_eb, q))
    miss = abs(x - np.float64(r))
    # Only a difference strictly below bound is certainly within it (exceeds); one that lands
    # on it is a tie, escaped here and settled exactly afterwards (_settle_ties): deciding it
    # in quantize's loop made it up to 3.5x slower (it no longer vectorized).
    ok = representable & (miss < bound)
    tie = representable & (miss == bound)
    return (np.int32(q) if ok else np.int32(0)), r, ok, tie


@numba.njit(cache=True, nogil=True)
def quantize(values, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale, eb,
             codes, recon, escaped, bound):
    """Fill codes, recon (values' dtype) and the escape mask; return the number escaped.
    bound: what a reconstruction is checked against, eb; or for an F16 or BF16 tensor inf,
    as its check comes after narrowing (recheck_narrowed), which is where an element that
    misses keeps its code.

    values: float32/float64, 1-D. The prediction p, element by element in float64 in the
    order docs/format.md gives (so both sides compute it alike, with no prediction buffer):
    where last is not empty, linear: w_last[row] last + w_second[row] second_last (rows of
    row_length elements), plus the low-rank offset where offset (its exact sums, scaled by
    offset_scale: offset_at) is not empty, and the codes are multiplied by the sign of p (-1 where p < 0);
    else the offset alone where it is not empty (codes oriented alike); else 0 where ema is
    empty; else the EMA shift signs x |ema std + mean|. recon may be empty: the bound is
    checked all the same, and dequantize rebuilds the same values later.
    """
    two_eb = 2.0 * eb
    n_escaped = 0
    blocks_per_row = -(-row_length // _BLOCK)
    keep = recon.size > 0
    recon_type = recon.dtype.type
    # The loops are spelled out per kind of prediction: with the choice of prediction or the
    # element's work (arrays and all) in a helper function, numba 0.68 made them up to 20x
    # slower; the scalar linear_at costs nothing.
    # Rows are taken as slices: indexing from a computed start costs numba's negative-index
    # checks, which kept the loop from vectorizing (4x slower). And in blocks of _BLOCK
    # elements: a row of 2^21 elements without recon ran 5-7x slower than the same elements
    # in rows of 3072 (numba 0.68; measured, cause not pinned down).
    if last.size > 0:
        with_offset = offset.size > 0
        for block in range(w_last.size * blocks_per_row):
            row = block // blocks_per_row
            a, b = w_last[row], w_second[row]
            start = row * row_length + (block % blocks_per_row) * _BLOCK
            end = min(values.size, (row + 1) * row_length, start + _BLOCK)
            x_row, last_row, second_row = values[start:end], last[start:end], second_last[start:end]
            codes_row, escaped_row = codes[start:end], escaped[start:end]
            recon_row = recon[start:end] if keep else recon
            offset_row = offset[start:end] if with_offset else offset
            for j in range(end - start):
                p = linear_at(a, b, last_row[j], second_row[j])
                if with_offset:
                    p += offset_at(offset_row, j, offset_scale)
                q, r, ok, _ = _code_and_recon(np.float64(x_row[j]), p, bound, two_eb, recon_type)
                codes_row[j] = -q if p < 0.0 else q
                escaped_row[j] = not ok
                n_escaped += not ok
                if keep:
                    recon_row[j] = r if ok else x_row[j]
    elif offset.size > 0:  # low rank alone: the offset, codes oriented by its sign as the linear ones
        for i in range(values.size):
            p = offset_at(offset, i, offset_scale)
            q, r, ok, _ = _code_and_recon(np.float64(values[i]), p, bound, two_eb, recon_type)
            codes[i] = -q if p < 0.0 else q
            escaped[i] = not ok
            n_escaped += not ok
            if keep:
                recon[i] = r if ok else values[i]
    else:
        none = ema.size == 0
        for i in range(values.size):
            p = 0.0 if none else _ema_shift_at(ema, mean, std, signs, i)
            q, r, ok, _ = _code_and_recon(np.float64(values[i]), p, bound, two_eb, recon_type)
            codes[i] = q
            escaped[i] = not ok
            n_escaped += not ok
            if keep:
                recon[i] = r if ok else values[i]
    if n_escaped:  # (a tie counts as an escape in the loop: counting ties there cost 2.4x)
        n_escaped -= _settle_ties(values, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset,
                                  offset_scale, eb, codes, recon, escaped, bound)
    return n_escaped


@numba.njit(cache=True, nogil=True)
def _settle_ties(values, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale, eb,
                 codes, recon, escaped, bound):
    """After quantize's loop: each escaped element whose reconstruction lies exactly bound
    from it in float64, and within bound in exact arithmetic (exceeds), gets its code and
    reconstruction back, as an exact check inside the loop would have given them. Returns
    how many. Cold, so the prediction is spelled out element by element here."""
    two_eb = 2.0 * eb
    recon_type = recon.dtype.type
    keep = recon.size > 0
    oriented = last.size > 0 or offset.size > 0  # linear and low-rank codes carry the sign of p
    settled = 0
    for i in range(values.size):
        if not escaped[i]:
            continue
        if last.size > 0:
            row = i // row_length
            p = linear_at(w_last[row], w_second[row], last[i], second_last[i])
            if offset.size > 0:
                p += offset_at(offset, i, offset_scale)
        elif offset.size > 0:
            p = offset_at(offset, i, offset_scale)
        elif ema.size == 0:
            p = 0.0
        else:
            p = _ema_shift_at(ema, mean, std, signs, i)
        x = np.float64(values[i])
        _, r, _, tie = _code_and_recon(x, p, bound, two_eb, recon_type)
        if tie and not exceeds(x, np.float64(r), bound):
            code = np.int32(math.floor((x - p) / two_eb + 0.5))
            codes[i] = -code if oriented and p < 0.0 else code
            escaped[i] = False
            if keep:
                recon[i] = r
            settled += 1
    return settled


@numba.njit(cache=True, nogil=True)
def dequantize(codes, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale, eb,
               recon):
    """Rebuild x' = p + 2 eb q into recon (any float dtype), p as in quantize (linear codes
    multiplied back by the sign of p); escaped slots are overwritten later."""
    two_eb = 2.0 * eb
    recon_type = recon.dtype.type
    if last.size > 0:
        with_offset = offset.size > 0
        for row in range(w_last.size):
            a, b = w_last[row], w_second[row]
            start = row * row_length
            end = min(codes.size, start + row_length)
            codes_row, recon_row = codes[start:end], recon[start:end]
            last_row, second_row = last[start:end], second_last[start:end]
            offset_row = offset[start:end] if with_offset else offset
            for j in range(end - start):
                p = linear_at(a, b, last_row[j], second_row[j])
                if with_offset:
                    p += offset_at(offset_row, j, offset_scale)
                q = np.float64(codes_row[j])
                recon_row[j] = recon_type(_reconstruct(p, two_eb, -q if p < 0.0 else q))
        return
    if offset.size > 0:
        for i in range(codes.size):
            p = offset_at(offset, i, offset_scale)
            q = np.float64(codes[i])
            recon[i] = recon_type(_reconstruct(p, two_eb, -q if p < 0.0 else q))
        return
    none = ema.size == 0
    for i in range(codes.size):
        p = 0.0 if none else _ema_shift_at(ema, mean, std, signs, i)
        recon[i] = recon_type(_reconstruct(p, two_eb, np.float64(codes[i])))


@numba.njit(cache=True, nogil=True, inline="always")
def patch_escapes(recon, escape_index, escape_values):
    """recon[escape_index[k]] = escape_values[k]: the values stored exactly, where the
    quantizer's code would have missed the bound (positions in range: the caller checks)."""
    for k in range(escape_index.size):
        recon[escape_index[k]] = escape_values[k]


@numba.njit(cache=True, nogil=True)
def dequantize_runs(codes, run_ends, ebs, recon):
    """dequantize without prediction over consecutive runs of codes, run r (ending before
    run_ends[r]) at bound ebs[r], into recon (float64): a bundle's members in one call. The
    same expression as dequantize's, so cast to a member's float type it is the same value."""
    start = 0
    for r in range(run_ends.size):
        two_eb = 2.0 * ebs[r]
        for i in range(start, run_ends[r]):
            recon[i] = _reconstruct(0.0, two_eb, np.float64(codes[i]))
        start = run_ends[r]


@numba.njit(cache=True, nogil=True)
def quantize_runs(values, run_ends, ebs, codes, recon):
    """quantize without prediction over consecutive runs of values, run r (ending before
    run_ends[r]) at bound ebs[r], into codes and recon (values' dtype): a bundle's float32
    members in one call. Returns each run's escape count (a run with any escape is stored
    exactly, so its codes and recon are not used; so is a run whose bound is not positive
    and finite, which counts all its elements as escaped and is not read). The element's
    expression is quantize's, so a run's codes and recon are what quantize gives its member alone."""
    escapes = np.zeros(run_ends.size, np.int64)
    recon_type = recon.dtype.type
    start = 0
    for r in range(run_ends.size):
        eb = ebs[r]
        two_eb = 2.0 * eb
        if not (eb > 0.0 and math.isfinite(eb)):
            escapes[r] = run_ends[r] - start
            start = run_ends[r]
            continue
        n_escaped = 0
        for i in range(start, run_ends[r]):
            q, value, ok, _ = _code_and_recon(np.float64(values[i]), 0.0, eb, two_eb, recon_type)
            codes[i] = q
            recon[i] = value
            n_escaped += not ok
        if n_escaped:  # ties settled exactly, as quantize's (_settle_ties)
            for i in range(start, run_ends[r]):
                x = np.float64(values[i])
                _, value, _, tie = _code_and_recon(x, 0.0, eb, two_eb, recon_type)
                if tie and not exceeds(x, np.float64(value), eb):
                    codes[i] = np.int32(math.floor(x / two_eb + 0.5))
                    n_escaped -= 1
        escapes[r] = n_escaped
        start = run_ends[r]
    return escapes


@numba.njit(cache=True, nogil=True)
def finite_ranges(values, run_ends):
    """finite_range of each run of values (run r ends before run_ends[r]): counts, mins, maxes."""
    counts = np.zeros(run_ends.size, np.int64)
    los = np.full(run_ends.size, math.inf)
    his = np.full(run_ends.size, -math.inf)
    start = 0
    for r in range(run_ends.size):
        count, lo, hi = finite_range(values[start:run_ends[r]])
        counts[r], los[r], his[r] = count, lo, hi
        start = run_ends[r]
    return counts, los, his


@numba.njit(cache=True, nogil=True, inline="always")
def _decoded_at(i, code, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale,
                two_eb):
    """The value dequantize rebuilds for element i from its code, as float64 (the caller
    casts it to the recon dtype): its expressions, so the same bits. A range's arguments index
    rows from the range's start, as _ranged cuts them."""
    q = np.float64(code)
    if last.size > 0:
        row = i // row_length
        p = linear_at(w_last[row], w_second[row], last[i], second_last[i])
        if offset.size > 0:
            p += offset_at(offset, i, offset_scale)
        return _reconstruct(p, two_eb, -q if p < 0.0 else q)
    if offset.size > 0:
        p = offset_at(offset, i, offset_scale)
        return _reconstruct(p, two_eb, -q if p < 0.0 else q)
    p = 0.0 if ema.size == 0 else _ema_shift_at(ema, mean, std, signs, i)
    return _reconstruct(p, two_eb, q)


@numba.njit(cache=True, nogil=True)
def recheck_narrowed(values, eb, recon, escaped, deltas, float16):
    """The bound in the narrow dtype, for F16 (float16 True) or BF16, after quantize (bound
    inf) filled recon (float32) and escaped. Each element's reconstruction is narrowed and
    widened back in place (as widen(narrow(recon))); one that is then further than eb from
    its value escapes, keeping its code, and deltas[i] = its value's narrow bits minus those
    of its reconstruction, mod 2**16 (patch_escape_deltas adds them back): a near miss is a
    step or two of the narrow dtype's spacing, so a delta costs a few bits where the value
    cost 16 (stream format 8). recon then holds the value (exact in the narrow dtype:
    narrowing and widening give it back unchanged, NaN payloads too). Returns (how many
    escaped here, how many quantize escaped: their deltas are escaped_deltas' to fill). (A
    near miss's reconstruction is never NaN: quantize escapes those.) One pass instead of
    numpy's casts and masks."""
    # float16 a constant in each copy of the loop: with the choice inside it the loop ran
    # 1.4x slower (LLVM no longer took the choice out of the loop); and a call to another
    # kernel in here, even after the loop, made it 1.5x slower: the caller makes that call
    if float16:
        return _recheck_loop(values, eb, recon, escaped, deltas, True)
    return _recheck_loop(values, eb, recon, escaped, deltas, False)


@numba.njit(cache=True, nogil=True, inline="always")
def _recheck_loop(values, eb, recon, escaped, deltas, float16):
    bits = recon.view(np.uint32)
    value_bits = values.view(np.uint32)
    added = escaped_before = 0
    for i in range(values.size):
        if escaped[i]:
            escaped_before += 1
            continue
        rebuilt = narrowed_bits(bits[i], float16)
        bits[i] = widened_bits(rebuilt, float16)
        if not exceeds(np.float64(values[i]), np.float64(recon[i]), eb):
            continue
        escaped[i] = True
        recon[i] = values[i]
        added += 1
        deltas[i] = _delta(value_bits[i], np.uint32(rebuilt), float16)
    return added, escaped_before


@numba.njit(cache=True, nogil=True)
def escaped_deltas(values, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale,
                   eb, codes, recon, escaped, deltas, float16):
    """After recheck_narrowed, where quantize escaped any element (NaN, Inf, -0.0, beyond the
    codes' range: code 0; rare): every escaped element's delta, from the value dequantize
    rebuilds from its code with these prediction arguments (_delta_base; a near miss's comes
    out as it was). recon holds the value: the decoder's is built in its place for its bits,
    then put back."""
    bits = recon.view(np.uint32)
    value_bits = values.view(np.uint32)
    two_eb = 2.0 * eb
    for i in range(values.size):
        if escaped[i]:
            recon[i] = np.float32(_decoded_at(i, codes[i], ema, mean, std, signs, last, second_last, w_last, w_second,
                                              row_length, offset, offset_scale, two_eb))
            deltas[i] = _delta(value_bits[i], _delta_base(recon, bits, i, float16), float16)
            recon[i] = values[i]


@numba.njit(cache=True, nogil=True, inline="always")
def _delta(value_bits, base, float16):
    """An escaped element's delta: the narrow bits of its value (float32 bits) minus base, mod 2**16."""
    return np.uint16((np.uint32(narrowed_bits(value_bits, float16)) - base) & 0xFFFF)


@numba.njit(cache=True, nogil=True, inline="always")
def _delta_base(recon, bits, i, float16):
    """What an escaped element's delta is taken from: the narrow bits its reconstruction
    rounds to, or 0 where that is NaN. A NaN made by arithmetic (inf - inf in a prediction
    from a state holding infinities) has the sign IEEE 754 leaves to the hardware: x86 sets
    it, AArch64 does not, and a stream must decode alike on both."""
    return np.uint32(0) if math.isnan(recon[i]) else np.uint32(narrowed_bits(bits[i], float16))


@numba.njit(cache=True, nogil=True, inline="always")
def patch_escape_deltas(recon, escape_index, escape_deltas, float16):
    """An F16 (float16 True) or BF16 tensor's escaped elements in its float32 recon, before
    narrowing: the narrow bits recon[escape_index[k]] rounds to (0 where it is NaN), plus
    escape_deltas[k] mod 2**16 (recheck_narrowed), widened (positions in range: the caller
    checks)."""
    bits = recon.view(np.uint32)
    for k in range(escape_index.size):
        i = escape_index[k]
        half = (_delta_base(recon, bits, i, float16) + np.uint32(escape_deltas[k])) & 0xFFFF
        bits[i] = widened_bits(np.uint16(half), float16)


# From this many elements value_range tries numpy's vectorized min and max first (two calls'
# fixed cost against finite_range's 1.3 ns an element; 0.15 each for numpy's passes).
_NUMPY_RANGE_FROM = 1 << 13


def value_range(values):
    """finite_range's (count, min, max): where the min and max are finite and nonzero (every
    element is then finite, and which zero is the min cannot differ), numpy's two passes give
    them 4-5x faster on 1M float32 elements; else the kernel."""
    if values.size >= _NUMPY_RANGE_FROM:
        lo, hi = values.min(), values.max()
        if math.isfinite(lo) and math.isfinite(hi) and lo != 0 and hi != 0:
            return values.size, float(lo), float(hi)
    return finite_range(values)


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
