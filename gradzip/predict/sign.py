"""Sign predictor: kernel-level sign consistency plus round-to-round oscillation.

Kernel consistency: a conv kernel (one (out, in) slice of a 4-D weight with more than one
element) is *predictable* when at least tau of its elements share a sign. The encoder sends a
two-level bitmap: one bit per kernel (predictable or not), then one sign bit per predictable
kernel. Oscillation: the tensor-wide relation of each sign to the previous round's
reconstructed sign, sent as one mode (keep, flip or none). A kernel's sign wins where both apply.
"""
from __future__ import annotations

import numba
import numpy as np

# Share of a kernel's elements that must agree in sign before the kernel's sign is sent.
DEFAULT_TAU = 0.75

OSCILLATION_NONE, OSCILLATION_KEEP, OSCILLATION_FLIP = 0, 1, 2


def kernel_size(shape: tuple[int, ...]) -> int:
    """Elements per conv kernel, or 0 where the tensor has no kernels worth a bitmap."""
    if len(shape) == 4 and shape[2] * shape[3] > 1:
        return shape[2] * shape[3]
    return 0


@numba.njit(cache=True, nogil=True, inline="always")
def sign_of(value):
    """-1, 0 or +1 (NaN counts as 0)."""
    return 1 if value > 0 else (-1 if value < 0 else 0)


@numba.njit(cache=True, nogil=True)
def kernel_consistency(values, size, tau, predictable, kernel_sign):
    """Per kernel of `size` consecutive elements: is it sign-consistent, and which sign."""
    n_kernels = values.size // size
    for k in range(n_kernels):
        positive = 0
        negative = 0
        for j in range(k * size, (k + 1) * size):
            v = values[j]
            if v > 0:
                positive += 1
            elif v < 0:
                negative += 1
        dominant = max(positive, negative)
        predictable[k] = dominant >= tau * size
        kernel_sign[k] = positive >= negative


@numba.njit(cache=True, nogil=True)
def oscillation_agreement(values, previous_sign):
    """(elements whose sign equals the previous round's, elements with both signs nonzero)."""
    same = 0
    both = 0
    for i in range(values.size):
        v = values[i]
        s = 1 if v > 0 else (-1 if v < 0 else 0)
        if s != 0 and previous_sign[i] != 0:
            both += 1
            if s == previous_sign[i]:
                same += 1
    return same, both


@numba.njit(cache=True, nogil=True)
def predicted_signs(previous_sign, oscillation, size, predictable, kernel_sign, out):
    """Combine the oscillation mode and the kernel bitmap into a sign per element."""
    for i in range(previous_sign.size):
        if oscillation == OSCILLATION_KEEP:
            out[i] = previous_sign[i]
        elif oscillation == OSCILLATION_FLIP:
            out[i] = -previous_sign[i]
        else:
            out[i] = 0
    if size > 0:
        for k in range(predictable.size):
            if predictable[k]:
                s = 1 if kernel_sign[k] else -1
                for j in range(k * size, (k + 1) * size):
                    out[j] = s


@numba.njit(cache=True, nogil=True)
def signs_from_bitmap(previous_sign, oscillation, size, bitmap, out):
    """predicted_signs (size > 0) with the kernels' flags read from the bitmap as the encoder
    packs it (np.packbits, first bit most significant): a bit per kernel, whether it is
    predictable, then a bit per predictable kernel, its sign. False where the bitmap's length
    does not match its flags (out is then not filled). One kernel: unpacking with numpy and a
    masked assignment cost a 9216-element layer 20 us."""
    n_kernels = previous_sign.size // size
    head = (n_kernels + 7) // 8
    if bitmap.size < head:
        return False
    predictable = np.zeros(n_kernels, np.bool_)
    kernel_sign = np.zeros(n_kernels, np.bool_)
    n_signed = 0
    for k in range(n_kernels):
        predictable[k] = (bitmap[k >> 3] >> (7 - (k & 7))) & 1
        n_signed += predictable[k]
    if bitmap.size != head + (n_signed + 7) // 8:
        return False
    j = 0
    for k in range(n_kernels):
        if predictable[k]:
            kernel_sign[k] = (bitmap[head + (j >> 3)] >> (7 - (j & 7))) & 1
            j += 1
    predicted_signs(previous_sign, oscillation, size, predictable, kernel_sign, out)
    return True


def choose_oscillation(values: np.ndarray, previous_sign: np.ndarray, tau: float) -> int:
    """Keep or flip when at least tau of the signs follow that pattern, else none."""
    same, both = oscillation_agreement(values, previous_sign)
    if both == 0:
        return OSCILLATION_NONE
    if same >= tau * both:
        return OSCILLATION_KEEP
    if both - same >= tau * both:
        return OSCILLATION_FLIP
    return OSCILLATION_NONE
