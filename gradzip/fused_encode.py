"""One kernel call for the encoder's tail on a small tensor: undoing the codes' orientation,
dequantizing them into the reconstruction the decoder will build, patching in the escaped
values, hashing it and folding it into the new state.

The encoder's mirror of fused_decode.py: it composes the same modules' kernels
(predict/context.py, quantize.py, floats.py, checksum.py, predict/history.py) and adds no
arithmetic, so its bits are theirs. Three calls and the Python between them cost a 2304-element conv
layer about 8 of its 150 us a round (codec.py takes this path for every small float32 or
float64 tensor, _fused_fits: a kernel first used rounds later would load then, adding a
megabyte or so to that call's memory).
"""
from __future__ import annotations

import numba
import numpy as np

from .checksum import xxh64_kernel
from .floats import narrow_in_place
from .predict.context import orient_by_sign
from .predict.history import fold_round
from .quantize import dequantize, patch_escape_deltas, patch_escapes


@numba.njit(cache=True, nogil=True)
def reconstruct_and_fold(codes, orient_signs, ema, mean, std, signs, last, second_last, w_last, w_second, row_length,
                         offset, offset_scale, eb, recon, escape_index, escape_values, escape_deltas, fold_ema, beta,
                         first_round, ema_out, sign_out, last_out, narrowed, float16):
    """Fill recon (float32 or float64, the tensor's own dtype) from codes and the new state's
    ema_out, sign_out and last_out; return the XXH64 of recon's bytes. Where narrowed (uint16)
    is not empty the tensor is BF16, or F16 where float16 is True (the caller passes it only
    with a float32 recon): recon is narrowed into it (floats.narrow's rounding) and widened
    back in place, and the hash takes the narrow bits and the fold the widened values. orient_signs: the
    signs the codes were oriented by in place (empty: none), oriented back here; ema ..
    offset_scale: the prediction's kernel arguments (quantize.dequantize); escape_index,
    escape_values: quantize.patch_escapes', or where escape_deltas is not empty (a narrowed
    tensor's) escape_index and escape_deltas quantize.patch_escape_deltas'; fold_ema ..
    last_out: history.fold_round's, each as long as recon and of a state's own dtypes, which
    the caller checks (codec._Fold.fits), but last_out empty where recon is the new state's
    last array itself. ema_out may be the codes' own memory: they are read before the fold
    writes it."""
    if orient_signs.size > 0:
        orient_by_sign(codes, orient_signs)
    dequantize(codes, ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale, eb,
               recon)
    if escape_deltas.size > 0:
        patch_escape_deltas(recon, escape_index, escape_deltas, float16)
    else:
        patch_escapes(recon, escape_index, escape_values)
    if narrowed.size > 0:
        narrow_in_place(recon, narrowed, float16)
        recon_hash = xxh64_kernel(narrowed.view(np.uint8))
    else:
        recon_hash = xxh64_kernel(recon.view(np.uint8))
    fold_round(fold_ema, recon, beta, first_round, ema_out, sign_out, last_out)
    return recon_hash
