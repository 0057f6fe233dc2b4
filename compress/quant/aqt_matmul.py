"""The one module that calls Google's AQT (aqt.jax.v2): matmuls against stored integer weights.

Everything else in press speaks press's scheme names and parameter trees; if AQT is replaced
(its successor upstream is Qwix), only this file changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import config as aqt_config
from aqt.jax.v2 import tiled_dot_general
from aqt.jax.v2.numerics import utils as aqt_numerics

from compress.quant import grid
from compress.quant.schemes import Scheme


def einsum_dimension_numbers(equation: str) -> tuple:
    """dot_general dimension numbers of a projection einsum 'lhs,rhs->out' without batch axes.

    The output must be the lhs's free axes followed by the rhs's free axes (dot_general's
    order), which holds for every projection in press's models.
    """
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    contracted = [c for c in lhs if c in rhs]
    if any(c in out for c in contracted):
        raise ValueError(f"{equation}: axes shared by both operands and the output (batch axes) are not supported")
    expected = "".join(c for c in lhs if c not in contracted) + "".join(c for c in rhs if c not in contracted)
    if out != expected:
        raise ValueError(f"{equation}: the output must be ordered {expected} for an integer matmul")
    return ((tuple(lhs.index(c) for c in contracted), tuple(rhs.index(c) for c in contracted)), ((), ()))


def int_weight_einsum(
    equation: str, x: jnp.ndarray, qvalue: jnp.ndarray, scale: jnp.ndarray, bits: int, activation_bits: int | None = None
) -> jnp.ndarray:
    """einsum(equation, x, qvalue * scale) with the integer weights fed to AQT as they are stored.

    qvalue: integer weights in the kernel's layout; scale: float, the kernel's shape with the
    contracted axes of size 1. With activation_bits, AQT quantizes x per token on the fly and
    the product runs on integers (w8a8). No float copy of the weights exists outside this matmul.
    """
    dimension_numbers = einsum_dimension_numbers(equation)
    return _int_weight_dot(x, qvalue, scale, equation, dimension_numbers, bits, activation_bits)


# Gradients to the activations through stored integer weights (QLoRA: the adapters of earlier
# layers learn through this matmul). AQT's serving path refuses any gradient into a QTensor, so
# the backward pass is written here: dx = g . (qvalue * scale)^T, straight through x's own
# quantization under w8a8, with the scale folded into g (scale varies along output axes only),
# so no float copy of the weights is made for it either. The integers get no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _int_weight_dot(x, qvalue, scale, equation, dimension_numbers, bits, activation_bits):
    return _dg_core(x, qvalue, scale, dimension_numbers, bits, activation_bits)


def _int_weight_dot_fwd(x, qvalue, scale, equation, dimension_numbers, bits, activation_bits):
    return _dg_core(x, qvalue, scale, dimension_numbers, bits, activation_bits), (qvalue, scale)


def _int_weight_dot_bwd(equation, dimension_numbers, bits, activation_bits, residuals, g):
    qvalue, scale = residuals
    inputs, out = equation.split("->")
    lhs, rhs = inputs.split(",")
    kept = "".join(c for c in rhs if c not in lhs)
    s = scale.reshape([n for n, c in zip(scale.shape, rhs) if c in kept]).astype(g.dtype)  # [*out]
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g * s, qvalue.astype(g.dtype))
    return dx, None, None


_int_weight_dot.defvjp(_int_weight_dot_fwd, _int_weight_dot_bwd)


def _dg_core(x, qvalue, scale, dimension_numbers, bits, activation_bits=None):
    qt = aqt_tensor.QTensor(qvalue=qvalue, scale=[scale.astype(x.dtype)], scale_t=None, bias=[], dequant_dtype=x.dtype)
    placeholder = jnp.zeros(qvalue.shape, x.dtype)  # AQT wants the float operand's shape; unused, compiled away
    out, _ = _config(bits, activation_bits).dg_core(
        lhs=x, rhs=placeholder, lhs_qt=None, rhs_qt=qt, dimension_numbers=dimension_numbers
    )
    return out.astype(x.dtype)


@functools.cache
def _config(bits: int, activation_bits: int | None):
    """The AQT dot_general config of a scheme, for serving (dg_core with stored integer
    weights) and training (called on float weights: quantized in the forward pass,
    straight-through gradients in float).

    Weights: absmax scales over the contracted axes (of each tile) with `preserve_max_val`,
    i.e. scale = absmax / (2^(bits-1) - 1), the grid `press quantize` stores. Activations
    (w8a8): the same, per token, computed on the fly; the product then runs on integers.
    """
    cfg = aqt_config.dot_general_make(lhs_bits=activation_bits, rhs_bits=bits)
    lhs = aqt_numerics.get_numerics(activation_bits, preserve_max_val=True)
    aqt_config.set_numerics(cfg.fwd, lhs, aqt_numerics.get_numerics(bits, preserve_max_val=True))
    if activation_bits is not None:
        cfg.fwd.dg_quantizer.lhs.calibration = cfg.fwd.dg_quantizer.rhs.calibration
    return cfg


def _tile_sizes(equation: str, shape: tuple[int, ...], group_size: int) -> dict[str, int]:
    """AQT tile sizes of every contracted letter so that each tile is one group of
    `group_size` consecutive inputs in row-major order: the axis where the group ends is
    split, axes inside it stay whole, axes outside it are tiled one by one."""
    lhs, rhs = equation.split("->")[0].split(",")
    sizes = dict(zip(rhs[len(rhs) - len(shape):], shape))
    contracted = [c for c in rhs if c in lhs]
    tiles, inner = {}, 1
    for letter in reversed(contracted):
        size = sizes[letter]
        if inner >= group_size:
            tiles[letter] = 1
        elif inner * size >= group_size:
            if (group_size % inner) or size % (group_size // inner):
                raise ValueError(f"group size {group_size} does not tile the inputs of {equation} ({shape})")
            tiles[letter] = group_size // inner
        else:
            tiles[letter] = size
        inner *= size
    if inner % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {inner} of {equation}")
    return tiles


def fake_quant_einsum(
    equation: str,
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    bits: int,
    group_size: int | None = None,
    zero_point: bool = False,
    activation_bits: int | None = None,
) -> jnp.ndarray:
    """einsum(equation, x, kernel) with the kernel (and optionally x) quantized in training mode.

    Per-channel and symmetric group-wise schemes go through AQT's dot_general (group-wise
    via AQT's `tiled_dot_general`, which makes each group a tile with its own scale).
    Asymmetric groups have no AQT calibration in 0.9, so their weights are rounded here to
    the same grid `press quantize` uses, with a straight-through gradient.
    """
    dimension_numbers = einsum_dimension_numbers(equation)
    kernel = kernel.astype(x.dtype)
    if zero_point:
        scheme = Scheme(f"int{bits}-g{group_size}-asym", bits, "training grid", group_size=group_size, zero_point=True)
        w = kernel + jax.lax.stop_gradient(grid.round_trip(kernel, equation, scheme) - kernel)
        return jnp.einsum(equation, x, w)
    dot_general = _config(bits, activation_bits)
    if group_size is None:
        return dot_general(x, kernel, dimension_numbers).astype(x.dtype)
    tiling = tiled_dot_general.Cfg.from_einsum(equation, _tile_sizes(equation, kernel.shape, group_size))
    out = tiled_dot_general.tiled_dot_general(tiling, x, kernel, dimension_numbers, dot_general=dot_general)
    return out.astype(x.dtype)
