"""Float dtypes the lossy path handles, and exact conversion to and from the values it computes on.

F16 and BF16 are widened to float32 (exact) for quantization and narrowed back with
round-to-nearest-even; the bound is then checked again in the narrow dtype.
"""
from __future__ import annotations

import numba
import numpy as np

from .tensorio import as_bfloat16

LOSSY_DTYPES = ("F16", "BF16", "F32", "F64")


def compute_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.float64) if dtype == "F64" else np.dtype(np.float32)


def widen(array: np.ndarray, dtype: str) -> np.ndarray:
    """Flat native-endian float32/float64 values of a lossy-dtype tensor (exact)."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if dtype == "BF16":
        return (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if flat.dtype == np.float16:  # (native order) numpy's cast, about 2x faster in a kernel
        return _float16_to_float32_bits(flat.view(np.uint16)).view(np.float32)
    return flat.astype(compute_dtype(dtype), copy=False)


def narrow(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast computed values back to the tensor's dtype (flat), rounding to nearest even."""
    if dtype == "BF16":
        return as_bfloat16(_narrowed(np.ascontiguousarray(values, dtype=np.float32), False))
    if dtype == "F16":
        if values.dtype == np.float32:  # numpy's cast (overflow to inf included), in a kernel
            return _narrowed(np.ascontiguousarray(values).reshape(-1), True).view(np.float16)
        with np.errstate(over="ignore"):  # overflow to inf is caught by the bound check
            return values.astype(np.float16)
    return values


@numba.njit(cache=True, nogil=True)
def as_float32(values):
    """values (float64) cast to float32 as numpy's astype casts them (round to nearest even,
    beyond float32's range to inf), without the floating-point error state numpy's cast would
    need set around it to stay silent on overflow (np.errstate: 3.5 us, a tenth of a small
    model's bundle decoding)."""
    out = np.empty(values.size, np.float32)
    for i in range(values.size):
        out[i] = np.float32(values[i])
    return out


def original_bits(array: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor's flat values in its own dtype (any dtype), little-endian, for exact storage."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if dtype == "BF16":
        return flat.view(np.uint16).astype("<u2", copy=False)
    return flat.astype(flat.dtype.newbyteorder("<"), copy=False)


@numba.njit(cache=True, nogil=True, inline="always")
def bfloat16_bits(b):
    """The BF16 bits of the float32 with bits b (uint32), rounded to nearest even."""
    if (b & 0x7F800000) == 0x7F800000 and (b & 0x007FFFFF) != 0:
        # NaN: truncate, so a NaN that came from BF16 keeps its exact bits (signalling ones
        # too); set the quiet bit only where truncation would leave an infinity.
        high = np.uint16(b >> 16)
        return high if (high & 0x7F) != 0 else np.uint16(high | 0x0040)
    rounding = np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))
    return np.uint16((b + rounding) >> 16)


@numba.njit(cache=True, nogil=True, inline="always")
def float16_bits(b):
    """The F16 bits of the float32 with bits b (uint32), rounded to nearest even (beyond F16's
    range: infinity), as numpy's cast gives them, NaN included: its top 10 payload bits, one
    more where they are all 0 (checked once on every float32; tests/test_kernels.py compares
    every F16 value, NaN payloads, ties, carries and random values near F16's range)."""
    sign = np.uint16((b >> 16) & 0x8000)
    exponent = np.int64((b >> 23) & 0xFF) - 127
    mantissa = np.int64(b & 0x7FFFFF)
    if exponent == 128 and mantissa != 0:
        return np.uint16(sign | 0x7C00 | (mantissa >> 13) | np.int64((mantissa >> 13) == 0))
    if exponent > 15:
        return np.uint16(sign | 0x7C00)
    if exponent >= -14:  # normal in F16 (a carry out of the mantissa rounds up the exponent)
        kept, dropped = mantissa >> 13, mantissa & 0x1FFF
        up = np.int64((dropped > 0x1000) | ((dropped == 0x1000) & ((kept & 1) == 1)))
        return np.uint16(sign | (((exponent + 15) << 10) + kept + up))
    if exponent < -25:
        return sign
    full = mantissa | 0x800000  # subnormal in F16: units of 2**-24
    shift = -exponent - 1
    kept, dropped, half = full >> shift, full & ((np.int64(1) << shift) - 1), np.int64(1) << (shift - 1)
    up = np.int64((dropped > half) | ((dropped == half) & ((kept & 1) == 1)))
    return np.uint16(sign | (kept + up))


@numba.njit(cache=True, nogil=True, inline="always")
def float16_as_float32_bits(h):
    """The float32 bits of the F16 value with bits h (exact, as numpy's cast)."""
    sign = np.uint32(h & 0x8000) << 16
    exponent = np.int64((h >> 10) & 0x1F)
    mantissa = np.uint32(h & 0x3FF)
    if exponent == 0x1F:
        return sign | np.uint32(0x7F800000) | (mantissa << 13)
    if exponent == 0:
        if mantissa == 0:
            return sign
        exponent = 1
        while (mantissa & 0x400) == 0:
            mantissa <<= 1
            exponent -= 1
        mantissa &= 0x3FF
    return sign | (np.uint32(exponent - 15 + 127) << 23) | (mantissa << 13)


@numba.njit(cache=True, nogil=True, inline="always")
def narrowed_bits(b, float16):
    """The F16 (float16 True) or BF16 bits of the float32 with bits b, as narrow rounds."""
    return float16_bits(b) if float16 else bfloat16_bits(b)


@numba.njit(cache=True, nogil=True, inline="always")
def widened_bits(h, float16):
    """The float32 bits of the F16 (float16 True) or BF16 value with bits h, as widen gives."""
    return float16_as_float32_bits(h) if float16 else np.uint32(np.uint32(h) << 16)


@numba.njit(cache=True, nogil=True)
def narrow_in_place(values, narrowed, float16):
    """narrowed = the F16 (float16 True) or BF16 bits of float32 values (as narrow gives
    them), and values widened back from them in place (as widen gives them): such a tensor's
    reconstruction and the float32 values its state folds."""
    bits = values.view(np.uint32)
    for i in range(values.size):
        half = narrowed_bits(bits[i], float16)
        narrowed[i] = half
        bits[i] = widened_bits(half, float16)


@numba.njit(cache=True, nogil=True)
def _float16_to_float32_bits(halves):
    out = np.empty(halves.size, np.uint32)
    for i in range(halves.size):
        out[i] = float16_as_float32_bits(halves[i])
    return out


@numba.njit(cache=True, nogil=True)
def _narrowed(values, float16):
    """The F16 (float16 True) or BF16 bits of float32 values."""
    out = np.empty(values.size, np.uint16)
    bits = values.view(np.uint32)
    for i in range(values.size):
        out[i] = narrowed_bits(bits[i], float16)
    return out
