"""Students made from a teacher by dropping layers: the kept layers' weights, everything else shared.

    config, params = keep_layers(teacher.config, teacher.params, every_nth_layer(30, 3))

A decoder's layers are stacked on a leading axis of every `params["layers"]` leaf, so a student
of layers (0, 3, 6, ...) is that axis indexed; the embeddings, final norm and LM head are the
teacher's. The result is an ordinary press decoder: it trains (compress/train), exports as a
Hugging Face directory, and serves, quantizes and evaluates like any other.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import numpy as np

from compress.errors import InputError
from compress.models import decoder


def every_nth_layer(num_layers: int, n: int) -> tuple[int, ...]:
    """Layers 0, n, 2n, ... and always the last one (it writes what the LM head reads)."""
    if n < 1 or num_layers < 1:
        raise InputError(f"every_nth_layer needs n >= 1 and num_layers >= 1, got n={n}, num_layers={num_layers}")
    return tuple(sorted({*range(0, num_layers, n), num_layers - 1}))


def keep_layers(config: decoder.DecoderConfig, params: Any, layers: Sequence[int]) -> tuple[decoder.DecoderConfig, Any]:
    """The decoder with only `layers` of the teacher (ascending, distinct, in range), in that order."""
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise InputError("keep_layers: keep at least one layer")
    if list(layers) != sorted(set(layers)):
        raise InputError(f"keep_layers: layers {list(layers)} must be distinct and ascending")
    if layers[0] < 0 or layers[-1] >= config.num_layers:
        raise InputError(f"keep_layers: layers {list(layers)} out of range for a teacher of {config.num_layers} layers")
    index = np.asarray(layers)
    student_layers = jax.tree.map(lambda leaf: leaf[index], params["layers"])
    return dataclasses.replace(config, num_layers=len(layers)), {**params, "layers": student_layers}
