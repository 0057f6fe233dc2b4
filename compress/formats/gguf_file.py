"""GGUF files (llama.cpp's format): metadata, tensors dequantized to float32, tokenizer.

Tensors are memory-mapped by `gguf.GGUFReader` and dequantized one at a time with
`gguf.quants`, so loading never holds a float copy of the whole model.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from compress.formats.tensor_source import FormatError

# Tensor types we dequantize (others fail with a clear message).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFFile:
    """One .gguf file: `metadata` (dict) and lazily dequantized tensors."""

    def __init__(self, path: str):
        import gguf

        self.path = path
        if not os.path.exists(path):
            raise FormatError(f"{path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(path, "r")
        except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad bytes
            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            try:
                self.metadata[key] = field.contents()
            except Exception as e:  # noqa: BLE001 - a malformed field must name itself
                raise FormatError(f"{path}: metadata key {key!r} cannot be decoded: {e}") from e
        self._tensors = {t.name: t for t in self._reader.tensors}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions innermost first; NumPy order is the reverse.
        return tuple(int(n) for n in reversed(self._tensor(name).shape.tolist()))

    def type_name(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self._tensors[name]

    def read(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensor(name)
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise FormatError(
                f"{self.path}: tensor {name!r} uses quantization {kind}, which press cannot dequantize; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        try:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001
            raise FormatError(f"{self.path}: tensor {name!r} ({kind}) cannot be dequantized: {e}") from e
        return np.asarray(values, np.float32).reshape(self.shape(name))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self.metadata:
            raise FormatError(f"{self.path}: metadata key {key!r} is missing")
        return self.metadata[key]
