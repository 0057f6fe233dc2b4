"""Models as pure functions over parameter pytrees: the bottom layer, importing nothing else of press.

  decoder     Llama-family causal LM (Llama 2/3, Mistral, Qwen2, SmolLM2): forward(params, tokens, config)
  encoder     BERT sentence encoder: forward / embed
  attention   grouped-query attention, masks, the KV cache
  rope        rotary embeddings (default, linear, llama3, yarn)
  linear      dense: the one matmul every projection goes through (float, or the kernel its spec names)
  params      ParamSpec trees: shapes, logical axes and initialisers from one description; dtypes
"""

from compress.models import attention, decoder, encoder, linear, params, rope
from compress.models.decoder import DecoderConfig
from compress.models.encoder import EncoderConfig
from compress.models.params import DTYPES, Dtype

__all__ = ["attention", "decoder", "encoder", "linear", "params", "rope", "DecoderConfig", "EncoderConfig",
           "DTYPES", "Dtype"]
