"""Model files: reading, writing and locating them, and placing tensors straight onto their shards.

  tensor_source     lazy named-tensor access; FormatError
  safetensors_file  safetensors files and sharded sets
  gguf_file         GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K dequantized on read)
  hf_decoder        Hugging Face decoder configs and tensor names; export
  gguf_decoder      GGUF decoder metadata and tensor names
  hf_bert           Hugging Face BERT encoders
  quantized         directories written by `press quantize` (integers and scales)
  registry          bundled model names and where their files are
  tokenizer         tokenizers (with chat templates), cached
  placement         recipes: each tensor read once, onto its sharding
"""

from compress.formats.registry import ModelLocation, resolve
from compress.formats.tensor_source import FormatError

__all__ = ["ModelLocation", "resolve", "FormatError"]
