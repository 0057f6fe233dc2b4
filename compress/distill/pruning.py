"""Width pruning: a student with fewer MLP channels and attention heads, chosen by their activations.

    windows = calibration_windows(tokenizer, count=64, seq_len=256)
    scores = importance(teacher.config, teacher.params, windows)
    config, params = prune_width(teacher.config, teacher.params, scores, mlp_dim=1024, num_heads=6)

Minitron (Muralidharan et al., 2024) scores each prunable unit by how large its activation is
on calibration text and keeps the largest, then distils the student from the teacher:

  MLP channel f of layer l   mean over tokens of |silu(gate(x)) * up(x)|_f, the input of `down`
  query head n of layer l    mean over tokens of ||y_n||_2, y = attention output, the input of `o`

A pruned channel or head is exactly the teacher with that channel's row of `down` (that head's
rows of `o`) set to zero: its contribution to the residual stream is all it had. Grouped-query
attention shares each key/value head among G = N / K query heads, so heads go in whole groups
(a group scores the sum of its query heads), and the student keeps K' = N' / G key/value heads.
Every layer keeps the same number of channels and groups (the layers are stacked on one axis),
but each layer its own best ones, in their original order. Embeddings and layer count are left
alone (students.keep_layers drops layers).

The scores are measured by running calibration windows through the layers under one
`jax.lax.scan` over the stacked layers per batch, through the decoder's layer-walk hook
(decoder.embed, decoder.layer_tables, decoder.decoder_layer), as GPTQ's calibration does.

Axes (as in compress/models/decoder.py): S calibration windows, B a batch of them, T positions,
L layers, D embed, F mlp hidden, N query heads, K key/value heads, G query heads per key/value
head, H head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from compress.data import corpus
from compress.errors import InputError
from compress.models import decoder


class Importance(NamedTuple):
    """Activation-based importance of a decoder's prunable units, measured on calibration text."""

    mlp: np.ndarray  # [L, F] float32: mean |input of down| per MLP channel
    heads: np.ndarray  # [L, N] float32: mean L2 norm of each query head's attention output (input of o)


# ----------------------------------------------------------------------------- calibration


def calibration_windows(tokenizer, count: int, seq_len: int, *, seed: int = 0, data: str | None = None) -> np.ndarray:
    """[count, seq_len] int32 token windows at random offsets (seeded) of text to calibrate on.

    The text is the train part of the bundled language reference (never its held-out part, so
    perplexity measured there stays held out), or the UTF-8 file `data`.
    """
    for name, value in (("count", count), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"calibration_windows: {name} must be a positive integer, got {value!r}")
    text, source = corpus.train_text(data)
    ids = tokenizer(text, verbose=False)["input_ids"]
    return corpus.random_windows(ids, seq_len, count, seed, source)


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_scores(params, tokens, config: decoder.DecoderConfig):
    """Sums over the batch's tokens: (|input of down| [L, F], ||head output||_2 [L, N]), float32.

    tokens: [B, T] whole windows (no padding), run through the decoder's layer-walk hook.
    """
    tables = decoder.layer_tables(config, jnp.ones(tokens.shape, bool))  # cos, sin [B, T, H]; allowed [B, T, T]

    def layer(x, p):
        x, inputs = decoder.decoder_layer(p, x, config, tables.cos, tables.sin, tables.attend)
        hidden = inputs["down"].astype(jnp.float32)  # [B, T, F]
        heads = inputs["o"].astype(jnp.float32)  # [B, T, N, H]
        head_norms = jnp.sqrt(jnp.einsum("BTNH,BTNH->BTN", heads, heads))  # [B, T, N]
        return x, (jnp.sum(jnp.abs(hidden), axis=(0, 1)), jnp.sum(head_norms, axis=(0, 1)))  # [F], [N]

    _, (mlp, heads) = jax.lax.scan(layer, decoder.embed(params, tokens, config), params["layers"])  # [L, F], [L, N]
    return mlp, heads


def importance(config: decoder.DecoderConfig, params: dict[str, Any], windows: np.ndarray, *,
               batch_size: int = 8) -> Importance:
    """Importance of every MLP channel and query head of the decoder on calibration windows.

    Args:
      config, params: a float decoder (compress/models/decoder.py).
      windows: [S, T] int token ids, whole windows (no padding), e.g. `calibration_windows`.
      batch_size: windows per forward pass (bounds activation memory, not the result).
    Returns:
      Importance: mlp [L, F] and heads [L, N], means over the S * T tokens.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.size == 0 or not np.issubdtype(windows.dtype, np.integer):
        raise InputError(f"importance: windows must be a non-empty int array [windows, positions], "
                         f"got {windows.dtype} of shape {windows.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"importance: batch_size must be a positive integer, got {batch_size!r}")
    _check_float_layers(params)
    s, t = windows.shape
    mlp = jnp.zeros((config.num_layers, config.mlp_dim), jnp.float32)  # [L, F]
    heads = jnp.zeros((config.num_layers, config.num_heads), jnp.float32)  # [L, N]
    for start in range(0, s, batch_size):
        rows = jnp.asarray(windows[start : start + batch_size], jnp.int32)
        batch_mlp, batch_heads = _batch_scores(params, rows, config=config)
        mlp, heads = mlp + batch_mlp, heads + batch_heads
    return Importance(mlp=np.asarray(mlp) / (s * t), heads=np.asarray(heads) / (s * t))


# ----------------------------------------------------------------------------- pruning


def _check_float_layers(params: dict[str, Any]) -> None:
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        if "kernel" not in params["layers"][name]:
            raise InputError(f"layers/{name} has no float kernel (keys: {', '.join(sorted(params['layers'][name]))}); "
                             f"prune the float model, then quantize the student")


def _checked_size(field: str, value: int | None, full: int, step: int = 1, why: str = "") -> int:
    """value, or `full` when None; an InputError unless it is a multiple of `step` from step to full."""
    if value is None:
        return full
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not step <= value <= full or value % step:
        allowed = f"a multiple of {step} from {step} to {full}" if step > 1 else f"an integer from 1 to {full}"
        raise InputError(f"prune_width: {field}={value!r}; choose {allowed}{why}")
    return int(value)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """[L, k] int: per row of scores [L, U], the k highest-scoring units in ascending index order
    (ties go to the lower index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [L, k]
    return np.sort(order, axis=1)


def _take(leaf: jnp.ndarray, index: np.ndarray, axis: int) -> jnp.ndarray:
    """leaf [L, ..., U (at axis), ...] gathered per layer at index [L, k] along axis."""
    shape = [1] * leaf.ndim
    shape[0], shape[axis] = index.shape
    return jnp.take_along_axis(leaf, jnp.asarray(index.reshape(shape)), axis=axis)


def _take_projection(p: dict[str, jnp.ndarray], index: np.ndarray, kernel_axis: int, bias_axis: int | None) -> dict:
    """A stacked projection {kernel, bias?} with kernel_axis (and bias_axis, if given) gathered."""
    out = {**p, "kernel": _take(p["kernel"], index, kernel_axis)}
    if "bias" in p and bias_axis is not None:
        out["bias"] = _take(p["bias"], index, bias_axis)
    return out


def prune_width(config: decoder.DecoderConfig, params: dict[str, Any], scores: Importance, *,
                mlp_dim: int | None = None, num_heads: int | None = None) -> tuple[decoder.DecoderConfig, dict[str, Any]]:
    """The decoder with each layer's `mlp_dim` most important MLP channels and `num_heads` query heads.

    Args:
      config, params: a float decoder (compress/models/decoder.py).
      scores: its Importance ([L, F] and [L, N]), from `importance`.
      mlp_dim: MLP channels F' to keep per layer, 1..F; None keeps all.
      num_heads: query heads N' to keep per layer, a multiple of G = N / K up to N; whole key/value
        groups go, the groups of highest summed head importance stay (K' = N' / G). None keeps all.
    Returns:
      (config with mlp_dim F', num_heads N', num_kv_heads K'; params whose layers hold
      gate/up kernels [L, D, F'] (biases [L, F']), down kernels [L, F', D], q kernels [L, D, N', H]
      (bias [L, N', H]), k/v kernels [L, D, K', H] (biases [L, K', H]) and o kernels [L, N', H, D]).
      Every other leaf is the teacher's own array.
    """
    L, F, N, K = config.num_layers, config.mlp_dim, config.num_heads, config.num_kv_heads
    G = N // K
    mlp_scores, head_scores = np.asarray(scores.mlp, np.float32), np.asarray(scores.heads, np.float32)
    if mlp_scores.shape != (L, F) or head_scores.shape != (L, N):
        raise InputError(f"prune_width: importance of shapes mlp {mlp_scores.shape}, heads {head_scores.shape} does not "
                         f"fit this decoder (needs mlp [{L}, {F}] and heads [{L}, {N}]); measure it on this model")
    _check_float_layers(params)
    mlp_dim = _checked_size("mlp_dim", mlp_dim, F)
    num_heads = _checked_size("num_heads", num_heads, N, G, why=(
        f" (grouped-query attention shares each of the {K} key/value heads among {G} query heads, "
        f"so heads are pruned in whole groups of {G})" if G > 1 else ""))

    layers = dict(params["layers"])
    if mlp_dim < F:
        channels = _top(mlp_scores, mlp_dim)  # [L, F']
        layers["gate"] = _take_projection(layers["gate"], channels, 2, 1)  # kernel [L, D, F], bias [L, F]
        layers["up"] = _take_projection(layers["up"], channels, 2, 1)
        layers["down"] = _take_projection(layers["down"], channels, 1, None)  # kernel [L, F, D]; bias [L, D] stays
    if num_heads < N:
        groups = _top(head_scores.reshape(L, K, G).sum(axis=2), num_heads // G)  # [L, K']
        query_heads = (groups[:, :, None] * G + np.arange(G)).reshape(L, num_heads)  # [L, N']: head n is in group n // G
        layers["q"] = _take_projection(layers["q"], query_heads, 2, 1)  # kernel [L, D, N, H], bias [L, N, H]
        layers["k"] = _take_projection(layers["k"], groups, 2, 1)  # kernel [L, D, K, H], bias [L, K, H]
        layers["v"] = _take_projection(layers["v"], groups, 2, 1)
        layers["o"] = _take_projection(layers["o"], query_heads, 1, None)  # kernel [L, N, H, D]; bias [L, D] stays
    student = dataclasses.replace(config, mlp_dim=mlp_dim, num_heads=num_heads, num_kv_heads=num_heads // G)
    return student, {**params, "layers": layers}
