"""Quantization: named schemes, pure transforms of parameter trees, and the matmuls that read them.

  schemes       the scheme names (int8, int4-gN[-asym], gptq-*, w8a8, smooth-w8a8, kv-int8)
  grid          grid arithmetic shared by round to nearest, GPTQ and QAT; 4-bit storage
  packed_int4   4-bit codes two to a byte, and their matmul in plain JAX
  aqt_matmul    the one module that calls Google's AQT
  matmul        MatmulSpec: the kernel a quantized projection carries (models/linear.py calls it)
  weights       round to nearest over a parameter tree; dequantization; logical axes of quantized trees
  gptq          GPTQ calibration, layer by layer
  smooth        SmoothQuant factors folded into the norms
  qat           quantization-aware training: fake_quantize(params) inside a jitted loss

Quantized directories on disk: compress/formats/quantized.py. `press quantize`:
compress/commands/quantize.py.
"""

from compress.quant.gptq import GPTQConfig
from compress.quant.matmul import MatmulSpec
from compress.quant.qat import fake_quantize
from compress.quant.schemes import Scheme, get, names
from compress.quant.weights import dequantize_kernel, is_quantized, quantize_params

__all__ = ["GPTQConfig", "MatmulSpec", "fake_quantize", "Scheme", "get", "names", "dequantize_kernel",
           "is_quantized", "quantize_params"]
