"""The one module that calls Google's AQT (aqt.jax.v2): matmuls against stored integer weights.

Everything else in press speaks press's scheme names and parameter trees; if AQT is replaced
(its successor upstream is Qwix), only this file changes.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from aqt.jax.v2 import aqt_tensor
from aqt.jax.v2 import config as aqt_config


@functools.cache
def _weight_only_config(bits: int):
    """AQT dot_general config: activations stay float, the right-hand side is `bits`-bit integer."""
    return aqt_config.dot_general_make(lhs_bits=None, rhs_bits=bits)


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


def int_weight_einsum(equation: str, x: jnp.ndarray, qvalue: jnp.ndarray, scale: jnp.ndarray, bits: int) -> jnp.ndarray:
    """einsum(equation, x, qvalue * scale) with the integer weights fed to AQT as they are stored.

    qvalue: integer weights in the kernel's layout; scale: float, the kernel's shape with the
    contracted axes of size 1. No float copy of the weights exists outside this matmul.
    """
    dimension_numbers = einsum_dimension_numbers(equation)
    qt = aqt_tensor.QTensor(qvalue=qvalue, scale=[scale.astype(x.dtype)], scale_t=None, bias=[], dequant_dtype=x.dtype)
    placeholder = jnp.zeros(qvalue.shape, x.dtype)  # AQT wants the float operand's shape; unused, compiled away
    out, _ = _weight_only_config(bits).dg_core(
        lhs=x, rhs=placeholder, lhs_qt=None, rhs_qt=qt, dimension_numbers=dimension_numbers
    )
    return out.astype(x.dtype)
