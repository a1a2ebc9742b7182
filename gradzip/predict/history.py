"""What a tensor's predictors keep of a round: the magnitude EMA (magnitude.py), the signs
(sign.py) and the reconstruction the linear predictor extrapolates from (linear.py), all
updated in one pass over the round's reconstruction: one kernel call and one pass per tensor
instead of three (a small model's round decodes its tensors in tens of microseconds each)."""
from __future__ import annotations

import numba
import numpy as np

from .magnitude import ema_normalization, ema_step
from .sign import sign_of


@numba.njit(cache=True, nogil=True)
def fold_round(ema, recon, beta, first_round, ema_out, sign_out, last_out):
    """ema_out, sign_out and last_out (float32: an F64 value beyond float32's range becomes
    inf) after the reconstruction recon; ema is not modified (ema_out may be ema itself)."""
    mean, inv_std = ema_normalization(recon)
    for i in range(recon.size):
        value = recon[i]
        ema_out[i] = ema_step(ema[i], value, mean, inv_std, beta, first_round)
        sign_out[i] = sign_of(value)
        last_out[i] = np.float32(value)
