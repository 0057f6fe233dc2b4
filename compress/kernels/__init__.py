"""Native kernels that XLA's CPU backend has no fast path for (cpu.py, cpu.cc): below the models
and the quantized matmuls so that both can call them."""
