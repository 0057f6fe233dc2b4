"""GPTQ: group-wise int4 weights chosen with calibration data and second-order error compensation.

Round to nearest quantizes every weight on its own. GPTQ (Frantar et al., 2022) quantizes a
projection's input columns one after another and, after each, moves the rounding error onto
the columns not yet quantized, weighted by the inverse Hessian H = X^T X of the projection's
inputs X on calibration text, so the projection's output error ||X (W - W_q)||^2 stays small
rather than each weight's. By default the columns go in decreasing order of H's diagonal
(the most active inputs first, while the most columns are left to absorb their error), each
group's grid fixed up front; without act_order a group's scale (and offset) is taken from
the error-compensated weights when its first column comes up. Either way a group's grid may
clip its range where that rounds the group better (clip_search). The result is stored exactly like
round-to-nearest `int4-gN[-asym]` (compress/quant/weights.py): only the integers and scales differ.

The decoder is quantized layer by layer: calibration sequences run through the layers
already quantized, the inputs of layer l's projections give their Hessians, its projections
are quantized, and the quantized layer's outputs feed layer l + 1.

Axes (one letter each in einsums):
  I  a projection's inputs, its contracted axes flattened row-major (GPTQ's columns)
  J  the same inputs again (the second axis of a Hessian)
  O  its outputs, the remaining axes flattened
  C  the inputs of one lazy-update block       G  groups of N consecutive inputs
  M  calibration tokens (sequences x positions)
  S  calibration sequences                     T  positions in a sequence
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from compress.errors import InputError
from compress.data import corpus
from compress.models import decoder
from compress.quant.schemes import Scheme
from compress.quant import grid
from compress.quant.grid import as_float16, contracted_axes, group_scale_offset, round_to_grid
from compress.quant.weights import dequantize_kernel, grouped_projection, quantize_params, to_quantize

HIGHEST = jax.lax.Precision.HIGHEST  # Hessians and error updates in full float32 on every backend


@dataclasses.dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ calibrates (the scheme decides bits, group size and zero points)."""

    num_sequences: int = 128  # calibration sequences, drawn at random from the text
    sequence_length: int = 256  # tokens per calibration sequence
    batch_size: int = 8  # sequences per forward pass (bounds activation memory, not the result)
    damping: float = 0.01  # added to the Hessian's diagonal, as a fraction of its mean
    block_size: int = 128  # inputs per lazy batch update; a multiple of the group size
    # Inputs in decreasing Hessian diagonal, each group's grid fixed up front from the weights
    # before compensation. On SmolLM2 int4-g64 (8 held-out windows) it took GPTQ from +24.7% to
    # +9.5% perplexity over float, and with clip_search to +7.0% (round to nearest: +44%).
    act_order: bool = True
    clip_search: int = 20  # >0: each group's scale (and offset) shrunk by the best of this many factors
    max_shrink: float = 0.2  # clip_search tries factors 1 down to 1 - max_shrink of the group's range
    seed: int = 0  # which windows of the text are drawn
    data: str | None = None  # a UTF-8 text file; None: the train part of pydoc_data.topics

    def __post_init__(self):
        for name in ("num_sequences", "sequence_length", "batch_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTQConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.damping, (int, float)) or isinstance(self.damping, bool) or not self.damping > 0:
            raise ValueError(f"GPTQConfig.damping must be a positive number, got {self.damping!r}")
        if isinstance(self.clip_search, bool) or not isinstance(self.clip_search, int) or self.clip_search < 0:
            raise ValueError(f"GPTQConfig.clip_search must be an integer >= 0, got {self.clip_search!r}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"GPTQConfig.max_shrink must be in [0, 1), got {self.max_shrink!r}")


# ----------------------------------------------------------------------------- one matrix


def _inverse_cholesky(hessian: jnp.ndarray) -> jnp.ndarray:
    """U [I, I], upper triangular with H^-1 = U^T U: row i holds how input i's error spreads.

    The Cholesky factor of H with its inputs reversed, reversed back, is an upper R with
    H = R R^T; then H^-1 = R^-T R^-1, so U = R^-1 (one factorisation, one triangular solve).
    """
    upper = jnp.linalg.cholesky(hessian[::-1, ::-1])[::-1, ::-1]  # [I, I]
    return jax.scipy.linalg.solve_triangular(upper, jnp.eye(hessian.shape[0], dtype=hessian.dtype), lower=False)


@functools.partial(jax.jit, static_argnames=("scheme", "config"))
def gptq_matrix(w: jnp.ndarray, hessian: jnp.ndarray, scheme: Scheme, config: GPTQConfig):
    """GPTQ of one matrix w [I, O] (inputs in storage order) against its inputs' Hessian [I, I].

    Compiled once per shape: every layer's projections of the same shape share the program.

    Returns (codes [I, O] float, on the scheme's integer grid; scale [G, O] and offset [G, O]
    (None when symmetric), float32 values exactly representable in float16; finite: a bool
    scalar, False when the damped Hessian was not positive definite).
    """
    n, block = scheme.group_size, config.block_size
    inputs, outputs = w.shape
    if hessian.shape != (inputs, inputs):
        raise ValueError(f"Hessian of shape {hessian.shape} for a matrix of {inputs} inputs")
    if block % n:
        raise ValueError(f"GPTQConfig.block_size={block} is not a multiple of the group size {n}")
    # Inputs never active in calibration carry no information: a unit diagonal keeps H invertible
    # and leaves their weights rounded to nearest (their off-diagonal entries are already zero).
    diagonal = jnp.diagonal(hessian)  # [I]
    hessian = hessian + jnp.diag(jnp.where(diagonal == 0, 1.0, 0.0))
    hessian = hessian + config.damping * jnp.mean(jnp.diagonal(hessian)) * jnp.eye(inputs)

    # Pad to whole blocks with inputs of zero weight and unit, uncorrelated Hessian: they quantize
    # to zero exactly and pass no error on.
    padded = -(-inputs // block) * block
    w = jnp.pad(w.astype(jnp.float32), ((0, padded - inputs), (0, 0)))  # [I', O]
    hessian = jax.scipy.linalg.block_diag(hessian, jnp.eye(padded - inputs))  # [I', I']
    groups = padded // n

    if config.act_order:
        # Largest diagonal first; groups stay N consecutive inputs in storage order, so their
        # scales are fixed up front from the uncompensated weights.
        order = jnp.concatenate([jnp.argsort(-jnp.diagonal(hessian)[:inputs], stable=True), jnp.arange(inputs, padded)])
        scale, offset = _group_grid(w.reshape(groups, n, outputs), scheme, config)  # [G, 1, O] each
        scale, offset = as_float16(scale[:, 0]), None if offset is None else as_float16(offset[:, 0])
    else:
        order = jnp.arange(padded)
        scale = jnp.ones((groups, outputs), jnp.float32)  # filled as each group comes up
        offset = jnp.zeros((groups, outputs), jnp.float32) if scheme.zero_point else None
    group_of = order // n  # [I'] the group of the input quantized at each step
    w = w[order]
    upper = _inverse_cholesky(hessian[order][:, order])  # [I', I']

    def quantize_block(b, carry):
        w, codes, scale, offset = carry
        start = b * block
        w_block = jax.lax.dynamic_slice(w, (start, 0), (block, outputs))  # [C, O]
        u_block = jax.lax.dynamic_slice(upper, (start, start), (block, block))  # [C, C]

        def quantize_group(g, carry):
            w_block, codes_block, errors, scale, offset = carry
            first = g * n
            if not config.act_order:
                current = jax.lax.dynamic_slice(w_block, (first, 0), (n, outputs))[None]  # [1, N, O]
                s, o = _group_grid(current, scheme, config)  # [1, 1, O] each
                scale = scale.at[(start + first) // n].set(as_float16(s[0, 0]))
                if o is not None:
                    offset = offset.at[(start + first) // n].set(as_float16(o[0, 0]))

            def quantize_column(j, carry):
                w_block, codes_block, errors = carry
                column = first + j
                row = w_block[column]  # [O]
                group = group_of[start + column]
                s, o = scale[group], None if offset is None else offset[group]
                code = round_to_grid(row, s, o, scheme)  # [O]
                error = (row - (code * s if o is None else code * s + o)) / u_block[column, column]  # [O]
                # Later inputs of the block absorb the error now (U is upper triangular).
                w_block = w_block - u_block[column][:, None] * error[None, :]
                return w_block, codes_block.at[column].set(code), errors.at[column].set(error)

            w_block, codes_block, errors = jax.lax.fori_loop(0, n, quantize_column, (w_block, codes_block, errors))
            return w_block, codes_block, errors, scale, offset

        zeros = jnp.zeros((block, outputs), jnp.float32)
        _, codes_block, errors, scale, offset = jax.lax.fori_loop(
            0, block // n, quantize_group, (w_block, zeros, zeros, scale, offset)
        )
        codes = jax.lax.dynamic_update_slice(codes, codes_block, (start, 0))
        # The lazy update: the block's errors reach every later input in one matmul (rows of
        # U before the block are zero; rows inside it are already quantized and unused).
        u_rows = jax.lax.dynamic_slice(upper, (start, 0), (block, padded))  # [C, I']
        w = w - jnp.einsum("CI,CO->IO", u_rows, errors, precision=HIGHEST)
        return w, codes, scale, offset

    codes = jnp.zeros((padded, outputs), jnp.float32)
    _, codes, scale, offset = jax.lax.fori_loop(0, padded // block, quantize_block, (w, codes, scale, offset))
    codes = jnp.zeros_like(codes).at[order].set(codes)[:inputs]  # back to storage order
    groups = inputs // n
    finite = jnp.all(jnp.isfinite(upper))
    return codes, scale[:groups], None if offset is None else offset[:groups], finite


def _group_grid(wg: jnp.ndarray, scheme: Scheme, config: GPTQConfig):
    """Scale and offset of groups wg [G, N, O]: each [G, 1, O] (offset None when symmetric).

    Round to nearest spans each group's full range. With config.clip_search = S, the range is
    also shrunk by S factors from 1 to 1 - max_shrink, and each group keeps the factor whose
    rounded weights are closest to it (squared error): clipping a rare large weight often
    buys a finer grid for all the others (the `mse` grid search of the GPTQ reference code).
    """
    scale, offset = group_scale_offset(wg, 0, scheme)
    if not config.clip_search:
        return scale, offset
    factors = jnp.linspace(1.0, 1.0 - config.max_shrink, config.clip_search)  # [S]

    def error(f):
        if offset is None:
            s, o = scale * f, None
        else:  # shrink [min, max] towards its middle
            middle = offset + scale * (scheme.levels - 1) / 2
            s, o = scale * f, middle - scale * f * (scheme.levels - 1) / 2
        s, o = as_float16(s), None if o is None else as_float16(o)
        q = round_to_grid(wg, s, o, scheme)
        w = q * s if o is None else q * s + o
        return jnp.sum((wg - w) ** 2, axis=1, keepdims=True), s, o  # [G, 1, O] each

    errors, scales, offsets = jax.vmap(error)(factors)  # [S, G, 1, O]
    best = jnp.argmin(errors, axis=0)[None]  # [1, G, 1, O]
    pick = lambda x: jnp.take_along_axis(x, best, axis=0)[0]
    return pick(scales), None if offset is None else pick(offsets)


def gptq_kernel(kernel: jnp.ndarray, equation: str, hessian: jnp.ndarray, scheme: Scheme, config: GPTQConfig):
    """One unstacked kernel [*in, *out] quantized by GPTQ into its stored form.

    hessian: [I, I] over the contracted axes of `equation` flattened row-major (I = prod(in)).
    Returns (the dict `grouped_projection` stores: qkernel, group_scale [G, *out], group_offset?, spec;
    finite, a bool scalar: False when the damped Hessian was not positive definite).
    """
    axes = contracted_axes(equation, kernel.ndim)
    if axes != tuple(range(len(axes))):
        raise ValueError(f"GPTQ needs a kernel whose contracted axes come first; {equation} contracts {axes}")
    grouped = grid.grouped(kernel, axes, scheme.group_size)  # [G, N, *out]; checks N divides the input width
    out_shape = kernel.shape[len(axes) :]
    w = grouped.reshape(-1, math.prod(out_shape))  # [I, O]
    codes, scale, offset, finite = gptq_matrix(w, hessian, scheme, config)
    as_groups = lambda x: None if x is None else x.reshape(x.shape[0], 1, *out_shape)  # [G, 1, *out]
    return grouped_projection(codes.reshape(kernel.shape), as_groups(scale), as_groups(offset), 0, scheme), finite


# ----------------------------------------------------------------------------- calibration data


def calibration_tokens(tokenizer, config: GPTQConfig) -> np.ndarray:
    """[S, T] int32: `num_sequences` windows of `sequence_length` tokens at random offsets (seeded)."""
    text, source = corpus.train_text(config.data)
    ids = tokenizer(text, verbose=False)["input_ids"]
    if len(ids) < config.sequence_length:
        raise InputError(f"{source}: the calibration text is {len(ids)} tokens, fewer than "
                         f"GPTQConfig.sequence_length={config.sequence_length}")
    return corpus.random_windows(ids, config.sequence_length, config.num_sequences, config.seed, source)


# ----------------------------------------------------------------------------- the decoder, layer by layer


def layer_batches(config: decoder.DecoderConfig, t: int, batch_size: int):
    """batches(x [S, T, D]) -> iterator of (rows [b, T, D], [cos, sin, allowed] for those rows):
    whole, unpadded sequences at positions 0..T-1, with the tables `forward` builds
    (decoder.layer_tables), for running calibration sequences through one layer at a time."""
    tables = decoder.layer_tables(config, jnp.ones((1, t), bool))  # cos, sin [1, T, H]; allowed [1, T, T]

    def batches(x):
        for start in range(0, x.shape[0], batch_size):
            rows = x[start : start + batch_size]
            yield rows, [jnp.broadcast_to(a, (rows.shape[0], *a.shape[1:])) for a in tables]

    return batches


def embed_tokens(params, config: decoder.DecoderConfig, tokens: np.ndarray) -> jnp.ndarray:
    """The residual stream entering layer 0 for tokens [S, T]: [S, T, D]."""
    return decoder.embed(params, jnp.asarray(tokens), config)


def _flat_inputs(x: jnp.ndarray, width: int) -> jnp.ndarray:
    """Activations [B, T, *in] -> [M, I] float32, inputs flattened row-major like the kernel's."""
    return x.reshape(-1, width).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_hessians(p, x, hessians, cos, sin, allowed, config: decoder.DecoderConfig):
    """hessians (name -> [I, I]) plus X^T X of each projection's inputs X for the batch x [B, T, D]."""
    _, inputs = decoder.decoder_layer(p, x, config, cos, sin, decoder.LayerTables(cos, sin, allowed).attend)
    out, done = {}, []
    for name, total in hessians.items():
        # Projections reading the same activations (q, k, v; gate, up) share one product.
        shared = next((h for a, h in done if a is inputs[name]), None)
        if shared is None:
            flat = _flat_inputs(inputs[name], total.shape[0])  # [M, I]
            shared = jnp.einsum("MI,MJ->IJ", flat, flat, precision=HIGHEST)
            done.append((inputs[name], shared))
        out[name] = total + shared
    return out


@functools.partial(jax.jit, static_argnames=("config",))
def _layer_output(p, x, cos, sin, allowed, config: decoder.DecoderConfig):
    """The layer's residual stream [B, T, D] for x [B, T, D]."""
    return decoder.decoder_layer(p, x, config, cos, sin, decoder.LayerTables(cos, sin, allowed).attend)[0]


def _quantize_layer(p, hessians, names, scheme: Scheme, config: GPTQConfig):
    """GPTQ of one layer's projections: name -> (stored dict, finite), and p with them dequantized."""
    stored, dequantized = {}, dict(p)
    for name in names:
        equation = decoder.PROJECTIONS[name]
        stored[name] = gptq_kernel(p[name]["kernel"], equation, hessians[name], scheme, config)
        dequantized[name] = {**p[name], "kernel": dequantize_kernel(stored[name][0], equation).astype(p[name]["kernel"].dtype)}
    return stored, dequantized


@jax.jit
def _head_hessian(x, final_norm, total, eps):
    flat = _flat_inputs(decoder.rms_norm(x, final_norm, eps), total.shape[0])  # [M, D]
    return total + jnp.einsum("MI,MJ->IJ", flat, flat, precision=HIGHEST)


def _checked(stored: tuple[dict, jnp.ndarray], where: str, config: GPTQConfig) -> dict:
    packed, finite = stored
    if not bool(finite):
        raise ValueError(f"GPTQ: the damped Hessian of {where} is not positive definite; "
                         f"raise GPTQConfig.damping (now {config.damping})")
    return packed


def quantize_decoder_tokens(
    params: dict[str, Any],
    config: decoder.DecoderConfig,
    scheme: Scheme,
    tokens: np.ndarray,
    calibration: GPTQConfig,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The decoder's parameters quantized by GPTQ on calibration tokens [S, T].

    Returns a tree laid out exactly as `quantize_params(params, decoder.PROJECTIONS, scheme)`
    (keep-float patterns honoured, biases and norms untouched). `log` receives a line per layer.
    """
    if scheme.calibration != "gptq" or scheme.group_size is None or scheme.weight_bits is None:
        raise InputError(f"GPTQ writes group-wise integer weights; scheme {scheme.name!r} is not a gptq-int4-gN scheme")
    log = log or (lambda line: None)
    selected = to_quantize(params, decoder.PROJECTIONS, scheme)  # path -> einsum; checks keep_float
    unknown = [p for p in selected if p != "lm_head" and not p.startswith("layers/")]
    if unknown:
        raise InputError(f"GPTQ quantizes layer projections and lm_head; it cannot place {', '.join(unknown)}")
    names = tuple(p.split("/", 1)[1] for p in selected if p.startswith("layers/"))
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [sequences, positions], got shape {tokens.shape}")
    t = tokens.shape[1]

    batches = layer_batches(config, t, calibration.batch_size)
    x = embed_tokens(params, config, tokens)  # [S, T, D]
    layers = params["layers"]
    stored: dict[str, list] = {name: [] for name in names}
    for layer in range(config.num_layers):
        p = jax.tree.map(lambda a: a[layer], layers)
        hessians = {name: jnp.zeros((math.prod(_input_shape(p[name]["kernel"], name)),) * 2, jnp.float32) for name in names}
        for rows, tables in batches(x):
            hessians = _layer_hessians(p, rows, hessians, *tables, config=config)
        hessians = {name: h / x.shape[0] / t for name, h in hessians.items()}  # mean over tokens
        packed, p = _quantize_layer(p, hessians, names, scheme, calibration)
        for name in names:
            stored[name].append(_checked(packed[name], f"layers/{name} of layer {layer}", calibration))
        x = jnp.concatenate([_layer_output(p, rows, *tables, config=config) for rows, tables in batches(x)])
        log(f"GPTQ: layer {layer + 1}/{config.num_layers} quantized")

    results = {f"layers/{name}": jax.tree.map(lambda *a: jnp.stack(a), *stored[name]) for name in names}
    if "lm_head" in selected:
        total = jnp.zeros((config.embed_dim,) * 2, jnp.float32)
        for rows, _ in batches(x):
            total = _head_hessian(rows, params["final_norm"], total, config.rms_norm_eps)
        head = gptq_kernel(params["lm_head"]["kernel"], decoder.PROJECTIONS["lm_head"], total / x.shape[0] / t,
                           scheme, calibration)
        results["lm_head"] = _checked(head, "lm_head", calibration)
    return quantize_params(params, decoder.PROJECTIONS, scheme, quantize=lambda path, kernel, axes: results[path])


def _input_shape(kernel: jnp.ndarray, name: str) -> tuple[int, ...]:
    axes = contracted_axes(decoder.PROJECTIONS[name], kernel.ndim)
    return tuple(kernel.shape[a] for a in axes)


def quantize_decoder(
    params: dict[str, Any],
    config: decoder.DecoderConfig,
    scheme: Scheme,
    tokenizer,
    calibration: GPTQConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`press quantize` with a gptq-* scheme: calibrate on text (GPTQConfig), return the quantized tree."""
    calibration = GPTQConfig() if calibration is None else calibration
    if not isinstance(calibration, GPTQConfig):
        raise TypeError(f"calibration must be a GPTQConfig, got {type(calibration).__name__}")
    tokens = calibration_tokens(tokenizer, calibration)
    return quantize_decoder_tokens(params, config, scheme, tokens, calibration, log=log)
