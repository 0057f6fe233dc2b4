"""Students made from a teacher by dropping layers: the kept layers' weights, everything else shared.

    config, params = keep_layers(teacher.config, teacher.params, every_nth_layer(30, 3))
    layers, losses = select_layers(teacher.config, teacher.params, windows, keep=20)

`select_layers` chooses which layers to keep by the loss on calibration text: greedily, one
layer at a time, it drops the layer whose removal raises the next-token cross-entropy least (the
depth-pruning criterion of Minitron and of Gromov et al.'s "unreasonable ineffectiveness of the
deeper layers", measured directly rather than through a proxy). On SmolLM2-135M, keeping 20 of 30
layers this way starts the student at a held-out cross-entropy of 4.4 nats where every third
layer and the last (11) start at 12.2 (BENCHMARKS.md, `benchmarks/distill.py --parts init`).

A decoder's layers are stacked on a leading axis of every `params["layers"]` leaf, so a student
of layers (0, 3, 6, ...) is that axis indexed; the embeddings, final norm and LM head are the
teacher's. The result is an ordinary press decoder: it trains (compress/train), exports as a
Hugging Face directory, and serves, quantizes and evaluates like any other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
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


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_inputs(params: Any, tokens: jnp.ndarray, config: decoder.DecoderConfig) -> jnp.ndarray:
    """[L, B, T, D]: the residual stream entering each layer."""
    tables = decoder.layer_tables(config, jnp.ones(tokens.shape, bool))

    def layer(x, p):
        return decoder.decoder_layer(p, x, config, tables.cos, tables.sin, tables.attend)[0], x

    return jax.lax.scan(layer, decoder.embed(params, tokens, config), params["layers"])[1]


@functools.partial(jax.jit, static_argnames=("config",))
def _tail_loss(params: Any, tail: Any, x: jnp.ndarray, tokens: jnp.ndarray, config: decoder.DecoderConfig) -> jnp.ndarray:
    """Mean next-token cross-entropy of `tokens` [B, T] when the stream `x` [B, T, D] runs through
    the stacked layers `tail` (possibly none) and the LM head."""
    tables = decoder.layer_tables(config, jnp.ones(tokens.shape, bool))

    def layer(x, p):
        return decoder.decoder_layer(p, x, config, tables.cos, tables.sin, tables.attend)[0], None

    x = jax.lax.scan(layer, x, tail)[0]
    log_probs = jax.nn.log_softmax(decoder.lm_head(params, x, config)[:, :-1])  # [B, T-1, V]
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def select_layers(config: decoder.DecoderConfig, params: Any, windows: np.ndarray, keep: int, *,
                  log: Callable[[str], None] | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The `keep` layers to keep, by greedy removal of the layer whose loss is least missed.

    Args:
      config, params: a float decoder (its layers are not changed).
      windows: [S, T] int token ids, whole windows (no padding): the text each removal is scored on.
      keep: how many layers stay, 1 <= keep <= config.num_layers.
    Returns:
      (the kept layers, ascending; the calibration cross-entropy after each removal, nats/token).

    Cost: L - keep rounds; a round runs the current layers once and, for each candidate, only the
    layers after it (from the stream the first run saved), so about n^2 / 2 layer passes of the
    S * T tokens for n layers left.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
        raise InputError(f"select_layers: windows must be an int array [windows, positions >= 2], "
                         f"got {windows.dtype} of shape {windows.shape}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= config.num_layers:
        raise InputError(f"select_layers: keep must be an integer in [1, {config.num_layers}], got {keep!r}")
    if any("kernel" not in params["layers"][name] for name in ("q", "down")):
        raise InputError("select_layers: the teacher holds integer weights; layers are chosen on float weights")
    tokens = jnp.asarray(windows, jnp.int32)
    kept, losses = list(range(config.num_layers)), []
    while len(kept) > keep:
        c, p = keep_layers(config, params, kept)
        inputs = _layer_inputs(p, tokens, config=c)  # [n, B, T, D]
        trial = [float(_tail_loss(p, jax.tree.map(lambda leaf: leaf[i + 1 :], p["layers"]), inputs[i], tokens,
                                  config=c))
                 for i in range(len(kept))]
        best = int(np.argmin(trial))
        losses.append(trial[best])
        if log:
            log(f"student: layer {kept[best]} dropped ({len(kept) - 1} left, calibration loss {trial[best]:.3f})")
        del kept[best]
    return tuple(kept), tuple(losses)
