"""Read-only, lazy access to the named tensors of a weights file.

A `TensorSource` lists names and shapes without reading data, and reads one
tensor at a time as float32 NumPy, so loaders can place each tensor straight
onto its device sharding without holding a float copy of the whole model.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class FormatError(ValueError):
    """A weights or config file is malformed, unsupported or does not match the model."""


class TensorSource(Protocol):
    path: str  # shown in error messages

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (integer tensors keep their dtype)."""
        ...
