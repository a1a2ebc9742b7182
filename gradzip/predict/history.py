"""What a tensor's predictors keep of a round: the magnitude EMA (magnitude.py), the signs
(sign.py) and the reconstruction the linear predictor extrapolates from (linear.py), all
updated in one pass over the round's reconstruction: one kernel call and one pass per tensor
instead of three (a small model's round decodes its tensors in tens of microseconds each).
A large tensor's pass runs in element ranges on several threads (fold_round_on)."""
from __future__ import annotations

import numba
import numpy as np

from ..parallel import MIN_SPAN, each, spans
from .magnitude import ema_normalization, ema_step
from .sign import sign_of


@numba.njit(cache=True, nogil=True)
def fold_round(ema, recon, beta, first_round, ema_out, sign_out, last_out):
    """ema_out, sign_out and last_out (float32: an F64 value beyond float32's range becomes
    inf) after the reconstruction recon; ema is not modified (ema_out may be ema itself).
    last_out empty: recon (float32) is itself the new last reconstruction. (Writing each
    value back into recon instead made the loop 2.6x slower: LLVM's overlap check between
    the arrays it reads and writes then sends it to its scalar version.)"""
    mean, inv_std = ema_normalization(recon)
    _fold_range(ema, recon, mean, inv_std, beta, first_round, ema_out, sign_out, last_out)


@numba.njit(cache=True, nogil=True)
def _fold_range(ema, recon, mean, inv_std, beta, first_round, ema_out, sign_out, last_out):
    write_last = last_out.size > 0  # (loop-invariant: LLVM makes a loop of each case)
    for i in range(recon.size):
        value = recon[i]
        ema_out[i] = ema_step(ema[i], value, mean, inv_std, beta, first_round)
        sign_out[i] = sign_of(value)
        if write_last:
            last_out[i] = np.float32(value)


def fold_round_on(ema, recon, beta, first_round, ema_out, sign_out, last_out, threads: int = 1) -> None:
    """fold_round, its element-wise pass split into ranges on up to `threads` threads for a
    large tensor (the statistics are one pass first, in the same order): the same bits."""
    if threads <= 1 or recon.size < 2 * MIN_SPAN:
        fold_round(ema, recon, beta, first_round, ema_out, sign_out, last_out)
        return
    mean, inv_std = ema_normalization(recon)

    def fold(span):
        a, b = span
        _fold_range(ema[a:b], recon[a:b], mean, inv_std, beta, first_round, ema_out[a:b], sign_out[a:b],
                    last_out[a:b] if last_out.size else last_out)

    each(fold, spans(recon.size, threads), threads)
