"""SmoothQuant: activation outliers moved into the weights, so int8 activations lose less.

w8a8 quantizes each token's activations with one scale, so a few input channels far larger
than the rest (common in LLMs, largest at the MLP's down projection) leave the others only a
few integer levels. SmoothQuant (Xiao et al., 2023) divides each input channel j by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies row j of the weights by it: X W = (X / s)(s W) exactly, in float. The division
is folded into the parameter that produces X, so no extra operation runs when serving:

  q, k, v      input  rms_norm(x) * attn_norm    ->  attn_norm / s, their rows * s
  gate, up     input  rms_norm(x) * mlp_norm     ->  mlp_norm / s,  their rows * s
  down         input  silu(gate) * up            ->  up's columns (and bias) / s, down's rows * s

(o's input, the attention output, would need the division folded into v per key/value head,
which grouped-query attention shares between query heads; it is left as it is.) max|X_j| is
measured on calibration text run through the float model layer by layer; max|W_j| is over
all outputs of the projections sharing that input.

Axes: D model width, F MLP width, M calibration tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compress.errors import InputError
from compress.models import decoder
from compress.quant.gptq import GPTQConfig, calibration_tokens, embed_tokens, layer_batches

# The projections reading each smoothed input, and the parameter its division is folded into.
GROUPS = {"attn": (("q", "k", "v"), "attn_norm"), "mlp": (("gate", "up"), "mlp_norm"), "down": (("down",), "up")}
DEFAULT_ALPHA = 0.5  # the migration strength of the paper's default


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_absmax(p, x, absmax, cos, sin, allowed, config: decoder.DecoderConfig):
    """(the layer's output [B, T, D], absmax with this batch's per-channel max |input| folded in)."""
    out, inputs = decoder.decoder_layer(p, x, config, cos, sin, decoder.LayerTables(cos, sin, allowed).attend)
    seen = {"attn": inputs["q"], "mlp": inputs["gate"], "down": inputs["down"]}
    return out, {g: jnp.maximum(absmax[g], jnp.max(jnp.abs(seen[g].astype(jnp.float32)), axis=(0, 1))) for g in GROUPS}


def activation_absmax(params, config: decoder.DecoderConfig, tokens: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Per-channel max |input| of each group over calibration tokens [S, T]: {'attn': [L, D], 'mlp': [L, D], 'down': [L, F]}."""
    batches = layer_batches(config, tokens.shape[1], batch_size)
    x = embed_tokens(params, config, tokens)
    widths = {"attn": config.embed_dim, "mlp": config.embed_dim, "down": config.mlp_dim}
    per_layer = []
    for layer in range(config.num_layers):
        p = jax.tree.map(lambda a: a[layer], params["layers"])
        absmax, outputs = {g: jnp.zeros((w,), jnp.float32) for g, w in widths.items()}, []
        for rows, tables in batches(x):
            out, absmax = _layer_absmax(p, rows, absmax, *tables, config=config)
            outputs.append(out)
        x = jnp.concatenate(outputs)
        per_layer.append(absmax)
    return {g: np.stack([np.asarray(a[g]) for a in per_layer]) for g in GROUPS}


def _row_absmax(kernel: jnp.ndarray, width: int) -> jnp.ndarray:
    """[L, width]: max |w| over the outputs of each input row of a stacked kernel [L, *in, *out]."""
    return jnp.max(jnp.abs(kernel.astype(jnp.float32)).reshape(kernel.shape[0], width, -1), axis=-1)


def smooth(params: dict[str, Any], absmax: dict[str, np.ndarray], alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """The float parameters with each group's input channels divided by s and its weight rows
    multiplied by it (module docstring): the same function, easier activations."""
    if not 0 <= alpha <= 1:
        raise InputError(f"SmoothQuant alpha must be in [0, 1], got {alpha!r}")
    layers = dict(params["layers"])
    for group, (names, producer) in GROUPS.items():
        a = jnp.asarray(absmax[group], jnp.float32)  # [L, width]
        width = a.shape[1]
        w = jnp.max(jnp.stack([_row_absmax(layers[n]["kernel"], width) for n in names]), axis=0)  # [L, width]
        s = jnp.where((a > 0) & (w > 0), a**alpha / jnp.maximum(w, 1e-8) ** (1 - alpha), 1.0)
        s = jnp.clip(s, 1e-5, 1e5)  # [L, width]
        for n in names:
            kernel = layers[n]["kernel"]  # [L, width..., out...]: rows along the input axes
            scaled = kernel.astype(jnp.float32).reshape(kernel.shape[0], width, -1) * s[:, :, None]
            layers[n] = {**layers[n], "kernel": scaled.reshape(kernel.shape).astype(kernel.dtype)}
        if producer.endswith("_norm"):
            layers[producer] = (layers[producer].astype(jnp.float32) / s).astype(layers[producer].dtype)
        else:  # the up projection's output columns (and bias) make the down projection's input
            up = layers[producer]
            kernel = up["kernel"]  # [L, D, F]
            up = {**up, "kernel": (kernel.astype(jnp.float32) / s[:, None, :]).astype(kernel.dtype)}
            if "bias" in up:
                up["bias"] = (up["bias"].astype(jnp.float32) / s).astype(up["bias"].dtype)
            layers[producer] = up
    return {**params, "layers": layers}


def smooth_decoder(params, config: decoder.DecoderConfig, tokenizer, calibration=None, *, alpha: float = DEFAULT_ALPHA,
                   log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`press quantize --scheme smooth-w8a8`: measure activations on calibration text (the
    text settings of a compress.quant.gptq.GPTQConfig: num_sequences, sequence_length, data,
    seed, batch_size), return the smoothed float parameters."""
    calibration = GPTQConfig() if calibration is None else calibration
    tokens = calibration_tokens(tokenizer, calibration)
    absmax = activation_absmax(params, config, tokens, calibration.batch_size)
    if log is not None:
        log(f"SmoothQuant: activation ranges of {config.num_layers} layers measured on {tokens.size} tokens")
    return smooth(params, absmax, alpha)
