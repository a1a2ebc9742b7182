"""Cross-round predictors: EMA magnitude, sign (kernel consistency, oscillation), coding contexts."""
