"""Adapters: low-rank updates to a model's projections, trained, merged, exported and served.

  lora   LoRA (and rsLoRA) as a pure transform of the parameter tree, composed with any base
         kernel (float, int8, packed int4, QAT fake-quant); merge, unmerge, trainable names
  peft   the PEFT format (adapter_config.json + adapter_model.safetensors), both ways
"""
