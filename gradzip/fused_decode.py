"""One kernel call for what the decoder does to a quantized record after reading it: entropy
decoding, orienting, dequantizing, patching in the escaped values, hashing the
reconstruction and folding it into the state.

It composes rans.py's decoding kernel with the encoder's own tail (fused_encode.py, itself
composed from the kernels of predict/context.py, quantize.py, floats.py, checksum.py and
predict/history.py) and adds no arithmetic of its own, so it gives their bits, and both
sides run one body for everything after the codes.
On a tensor of a few thousand elements numba's dispatch of four calls and the Python
between them cost more than the work (a 4096-element transformer record: 59 -> 45 us). The
codec takes this path where each of those steps would run as one call anyway (codec.py,
_fused_decode_fits); larger tensors split them across threads.
"""
from __future__ import annotations

import numba
import numpy as np

from .entropy.rans import OK, decode_stream_kernel
from .fused_encode import reconstruct_and_fold


@numba.njit(cache=True, nogil=True)
def decode_and_fold(raw, contexts, n_contexts, orient_signs,
                    ema, mean, std, signs, last, second_last, w_last, w_second, row_length, offset, offset_scale, eb, recon,
                    escape_index, escape_values, escape_deltas, fold_ema, beta, first_round, ema_out, sign_out, last_out,
                    narrowed, float16):
    """Fill recon (float32 or float64: the tensor's computed values) and the new state's
    ema_out, sign_out and last_out; return (status, XXH64 of the tensor's bytes). narrowed:
    for a BF16 or F16 tensor (float32 recon; float16 says which) its bits, filled from recon
    and hashed instead (fused_encode.reconstruct_and_fold), else empty. raw .. n_contexts:
    rans.decode_inputs' (the stream's bytes; contexts empty: all 0); orient_signs: the signs
    the codes were oriented by (empty: none); ema .. offset_scale: the prediction's kernel arguments (quantize.dequantize); escape_index,
    escape_values, escape_deltas: reconstruct_and_fold's (validated by the caller); fold_ema ..
    last_out: history.fold_round's, each as long as recon and of a state's own dtypes, which
    the caller checks (codec._Fold.fits), but last_out empty where recon is the new state's
    last array itself. On a status other than OK nothing after decoding ran.
    The codes live in ema_out's memory (float32, as many elements) until the fold overwrites
    it: 4 bytes an element less at the peak. The fold reads ema_out's old contents only where
    it is also fold_ema, on a first round, whose EMA ignores them."""
    codes = ema_out.view(np.int32)
    status = decode_stream_kernel(raw, contexts, n_contexts, codes)
    if status != OK:
        return status, np.uint64(0)
    # from here on, what the encoder does once its codes are coded
    return OK, reconstruct_and_fold(codes, orient_signs, ema, mean, std, signs, last, second_last, w_last, w_second,
                                    row_length, offset, offset_scale, eb, recon, escape_index, escape_values, escape_deltas,
                                    fold_ema, beta, first_round, ema_out, sign_out, last_out, narrowed, float16)
