"""Read-only, lazy access to the named tensors of a weights file.

A `TensorSource` lists names and shapes without reading data, and reads one
tensor at a time as float32 NumPy, so loaders can place each tensor straight
onto its device sharding without holding a float copy of the whole model.
"""

from __future__ import annotations

import json
import os
from typing import Protocol

import numpy as np

from compress.errors import InputError


class FormatError(InputError):
    """A weights or config file is malformed, unsupported or does not match the model."""


class TensorSource(Protocol):
    path: str  # shown in error messages

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str) -> np.ndarray:
        """The tensor as float32 (integer tensors keep their dtype)."""
        ...


def read_config_json(directory: str) -> tuple[dict, str]:
    """(the object in DIRECTORY/config.json, its path); FormatError naming the file otherwise."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError as e:
        raise FormatError(f"{directory}: no config.json (not a Hugging Face model directory)") from e
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: malformed JSON: {e}") from e
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return d, path
