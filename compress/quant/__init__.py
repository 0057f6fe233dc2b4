"""Quantization: named schemes, pure transforms of parameter trees, and the matmuls that read them."""
