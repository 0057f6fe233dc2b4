"""Typed configs of the jobs the `press` command runs (the schema of the YAML files in configs/)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from serve.sampling import SamplingParams

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # bundled name, Hugging Face directory or .gguf file
    param_dtype: Dtype = "float32"  # storage dtype of the weights
    dtype: Dtype = "float32"  # compute dtype of activations


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`press generate`: one prompt through the engine (greedy unless sampling says otherwise)."""

    model: ModelConfig = ModelConfig()
    prompt: str = ""
    chat: bool = False  # wrap the prompt as a user message in the model's chat template
    system: str | None = None  # an optional system message (with chat)
    sampling: SamplingParams = SamplingParams()
    max_seq_len: int = 2048  # KV-cache slots (prompt + new tokens), capped by the model's context
    stream: bool = True  # print text as it is generated (ignored with --json)

    def __post_init__(self):
        if self.system is not None and not self.chat:
            raise ValueError("system is a chat message; set chat=true to use it")
