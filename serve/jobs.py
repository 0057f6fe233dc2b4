"""Typed configs of the jobs the `press` command runs (the schema of the YAML files in configs/)."""

from __future__ import annotations

import dataclasses
from typing import Literal

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # bundled name, Hugging Face directory or .gguf file
    param_dtype: Dtype = "float32"  # storage dtype of the weights
    dtype: Dtype = "float32"  # compute dtype of activations


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`press generate`: greedy decoding of one prompt with a KV cache."""

    model: ModelConfig = ModelConfig()
    prompt: str = ""
    chat: bool = False  # wrap the prompt as a user message in the model's chat template
    system: str | None = None  # an optional system message (with chat)
    max_new_tokens: int = 128
    stream: bool = True  # print text as it is generated (ignored with --json)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.system is not None and not self.chat:
            raise ValueError("system is a chat message; set chat=true to use it")
