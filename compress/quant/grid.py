"""The integer grids weights are rounded to: group scales and offsets, rounding, 4-bit storage.

One module of grid arithmetic that round to nearest (compress/quant/weights.py), GPTQ
(compress/quant/gptq.py) and quantization-aware training (compress/quant/aqt_matmul.py) all
call, so the three agree on every code by construction.

Axes: a kernel is [lead?, *in, *out] (a leading stacked-layer axis where present); an
einsum contracts its `in` axes. Grouped, the inputs flattened row-major are cut into groups
of N consecutive inputs: [lead?, G, N, *out].

Grids:
  symmetric    code in -2^(b-1) .. 2^(b-1) - 1,  w = scale * code,           scale = max|w| / qmax
  asymmetric   code in 0 .. 2^b - 1,             w = scale * code + offset,  scale = (max - min) / (levels - 1),
                                                                             offset = min
Group scales and offsets are stored in float16, so codes are chosen against the rounded values.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp

from compress.quant import packed_int4
from compress.quant.schemes import Scheme


def contracted_axes(equation: str, kernel_ndim: int) -> tuple[int, ...]:
    """Kernel axes an einsum contracts; a leading extra axis (stacked layers) is never contracted."""
    lhs, rhs = equation.split("->")[0].split(",")
    offset = kernel_ndim - len(rhs)
    if offset not in (0, 1):
        raise ValueError(f"a kernel of {kernel_ndim} axes does not fit {equation}")
    return tuple(offset + i for i, c in enumerate(rhs) if c in lhs)


def output_axes_count(equation: str) -> int:
    """How many of the kernel's axes an einsum keeps (its output axes)."""
    lhs, rhs = equation.split("->")[0].split(",")
    return sum(c not in lhs for c in rhs)


def grouped(w: jnp.ndarray, axes: tuple[int, ...], group_size: int) -> jnp.ndarray:
    """[lead, *contracted, *out] -> [lead, G, N, *out] (the contracted axes must be contiguous)."""
    first, last = axes[0], axes[-1] + 1
    if axes != tuple(range(first, last)):
        raise ValueError(f"contracted axes {axes} are not contiguous")
    width = math.prod(w.shape[first:last])
    if width % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {width}")
    return w.reshape(*w.shape[:first], width // group_size, group_size, *w.shape[last:])


def as_float16(x: jnp.ndarray) -> jnp.ndarray:
    """x rounded to float16 and back: the value a stored scale or offset will have."""
    return x.astype(jnp.float16).astype(jnp.float32)


def group_scale_offset(wg: jnp.ndarray, lead: int, scheme: Scheme) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Round-to-nearest grid of grouped weights wg [lead, G, N, *out]: scale and offset [lead, G, 1, *out]
    each (offset None when symmetric), not yet rounded to float16. An all-zero group gets scale 1."""
    axis = lead + 1
    if scheme.zero_point:
        lo = jnp.min(wg, axis=axis, keepdims=True)
        hi = jnp.max(wg, axis=axis, keepdims=True)
        scale = (hi - lo) / (scheme.levels - 1)
        return jnp.where(scale == 0, 1.0, scale), lo
    scale = jnp.max(jnp.abs(wg), axis=axis, keepdims=True) / scheme.qmax
    return jnp.where(scale == 0, 1.0, scale), None


def round_to_grid(w: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None, scheme: Scheme) -> jnp.ndarray:
    """The integer code of w on a grid (float values, not yet cast): symmetric or asymmetric."""
    if offset is None:
        return jnp.clip(jnp.round(w / scale), -scheme.qmax - 1, scheme.qmax)
    return jnp.clip(jnp.round((w - offset) / scale), 0, scheme.levels - 1)


def nearest_groups(w: jnp.ndarray, axes: tuple[int, ...], scheme: Scheme):
    """Round to nearest, group-wise: (codes in w's shape, scale, offset [lead, G, 1, *out] as stored)."""
    lead = axes[0]
    wg = grouped(w.astype(jnp.float32), axes, scheme.group_size)  # [lead, G, N, *out]
    scale, offset = group_scale_offset(wg, lead, scheme)
    scale, offset = as_float16(scale), None if offset is None else as_float16(offset)
    return round_to_grid(wg, scale, offset, scheme).reshape(w.shape), scale, offset


def round_trip(kernel: jnp.ndarray, equation: str, scheme: Scheme) -> jnp.ndarray:
    """The kernel rounded to its group-wise grid and back to float (what `press quantize` would store,
    dequantized): quantization-aware training's forward value. Same dtype as `kernel`."""
    axes = contracted_axes(equation, kernel.ndim)
    codes, scale, offset = nearest_groups(kernel, axes, scheme)
    cg = grouped(codes, axes, scheme.group_size)  # [lead, G, N, *out]
    w = cg * scale if offset is None else cg * scale + offset
    return w.reshape(kernel.shape).astype(kernel.dtype)


def pack_groups(codes: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None, lead: int,
                scheme: Scheme) -> dict[str, Any]:
    """The stored arrays of group-wise codes (the kernel's shape) and [lead, G, 1, *out] grid:
    qkernel int8 [lead, G, N/2, *out] (two 4-bit codes a byte), group_scale float16
    [lead, G, *out] and, asymmetric, group_offset float16 [lead, G, *out]."""
    if scheme.weight_bits != 4:
        raise ValueError(f"group-wise weights are stored as 4-bit codes; scheme {scheme.name!r} has {scheme.weight_bits}")
    groups, out_shape = scale.shape[lead], scale.shape[lead + 2 :]
    cg = codes.reshape(*codes.shape[:lead], groups, -1, *out_shape)  # [lead, G, N, *out]
    stored = {"qkernel": packed_int4.pack(cg - 8 if scheme.zero_point else cg, lead + 1),  # -8..7 either way
              "group_scale": jnp.squeeze(scale, lead + 1).astype(jnp.float16)}
    if offset is not None:
        stored["group_offset"] = jnp.squeeze(offset, lead + 1).astype(jnp.float16)
    return stored


def unpack_groups(qkernel: jnp.ndarray, lead: int, zero_point: bool) -> jnp.ndarray:
    """The codes of a stored qkernel [lead, G, N/2, *out] as [lead, G, N, *out] int8 (0..15 asymmetric)."""
    codes = packed_int4.unpack(qkernel, lead + 1)
    return codes + 8 if zero_point else codes
