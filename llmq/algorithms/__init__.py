"""Quantization algorithms: pure functions (W[, H], scheme[, cfg]) -> QuantizedWeight."""
