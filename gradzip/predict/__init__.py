"""Cross-round predictors: EMA magnitude, sign (kernel consistency, oscillation), coding contexts."""

# numba fastmath flags of the encoder-only float sums (linear fits, scale levels): only
# reassociation, so LLVM vectorizes their reductions, and never 'nnan'/'ninf' (their
# finiteness checks must stay). What they yield is sent, so the decoder never recomputes it;
# kernels both sides run never use fastmath (docs/guarantees.md).
ENCODER_SUMS = {"reassoc"}
