"""Quantizing a parameter tree: a pure transform from float kernels to integer kernels plus scales.

A quantized projection is a dict that `compress.models.linear.dense` recognises and runs on
the integers (through compress/quant/aqt_matmul.py); logical axes carry over, so the
sharding table places quantized trees like float ones. Layouts (a leading stacked-layer
axis, where present, stays first in every array):

  per output channel (int8, w8a8)
    qkernel  int8     the kernel's shape
    scale    float32  the kernel's shape with its contracted (input) axes of size 1
  group-wise (int4-gN[-asym])
    qkernel  int8 [G, N/2, *output axes]   4-bit codes, two to a byte (compress/quant/packed_int4.py):
                                           symmetric -8..7, asymmetric 0..15 (stored minus 8)
    group_scale   float16 [G, *output axes]   G = (input width) / N, groups of N consecutive
    group_offset  float16 [G, *output axes]   inputs in row-major order of the input axes
                                              (asymmetric only: w = scale * q + offset)
  spec     a static (array-free) MatmulSpec: bits, group size, activation quantization
           (and, group-wise, the kernel's input shape, which the packed codes no longer show)

plus the float `bias`, if any. The spec is part of the tree's structure, not its data, so
jit, scan and sharding carry it along for free.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

import jax
import jax.numpy as jnp

from compress.models import linear
from compress.quant import aqt_matmul, packed_int4
from compress.quant.schemes import Scheme


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class MatmulSpec:
    """How the matmul of one quantized projection reads its arrays (static, no data)."""

    weight_bits: int
    group_size: int | None = None
    zero_point: bool = False
    activation_bits: int | None = None
    fake: bool = False  # training mode (QAT): a float kernel quantized inside the matmul
    input_shape: tuple[int, ...] | None = None  # group-wise: the kernel's contracted axes


def contracted_axes(equation: str, kernel_ndim: int) -> tuple[int, ...]:
    """Kernel axes an einsum contracts; a leading extra axis (stacked layers) is never contracted."""
    lhs, rhs = equation.split("->")[0].split(",")
    offset = kernel_ndim - len(rhs)
    if offset not in (0, 1):
        raise ValueError(f"a kernel of {kernel_ndim} axes does not fit {equation}")
    return tuple(offset + i for i, c in enumerate(rhs) if c in lhs)


def _grouped(w: jnp.ndarray, axes: tuple[int, ...], group_size: int) -> jnp.ndarray:
    """[lead, *contracted, *out] -> [lead, G, N, *out] (contracted axes are contiguous)."""
    first, last = axes[0], axes[-1] + 1
    if axes != tuple(range(first, last)):
        raise ValueError(f"contracted axes {axes} are not contiguous")
    width = math.prod(w.shape[first:last])
    if width % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {width}")
    return w.reshape(*w.shape[:first], width // group_size, group_size, *w.shape[last:])


def group_scale_offset(wg: jnp.ndarray, lead: int, scheme: Scheme) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Round-to-nearest parameters of grouped weights wg [lead, G, N, *out]: each [lead, G, 1, *out].

    Symmetric: scale = max|w| / qmax. Asymmetric: the group's [min, max] spans the 2^bits
    levels: scale = (max - min) / (levels - 1), offset = min.
    """
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


def spec_of(scheme: Scheme) -> MatmulSpec:
    return MatmulSpec(scheme.weight_bits, scheme.group_size, scheme.zero_point, scheme.activation_bits)


def quantize_kernel(kernel: jnp.ndarray, axes: tuple[int, ...], scheme: Scheme) -> dict[str, Any]:
    """Round-to-nearest quantization of one kernel whose input axes are `axes`."""
    w = kernel.astype(jnp.float32)
    if scheme.group_size is None:
        scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / scheme.qmax
        scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
        q = jnp.clip(jnp.round(w / scale), -scheme.qmax, scheme.qmax).astype(jnp.int8)
        return {"qkernel": q, "scale": scale, "spec": spec_of(scheme)}
    lead = axes[0]
    wg = _grouped(w, axes, scheme.group_size)  # [lead, G, N, *out]
    scale, offset = group_scale_offset(wg, lead, scheme)
    # Scales are stored in float16: round the grid to them first, so codes match the stored scale.
    scale = scale.astype(jnp.float16).astype(jnp.float32)
    offset = None if offset is None else offset.astype(jnp.float16).astype(jnp.float32)
    q = round_to_grid(wg, scale, offset, scheme)
    return pack_groups(q.reshape(kernel.shape), scale, offset, lead, scheme)


def pack_groups(q: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None, lead: int, scheme: Scheme) -> dict[str, Any]:
    """The stored form of group-wise codes q (the kernel's shape) and [lead, G, 1, *out] parameters."""
    if scheme.weight_bits != 4:
        raise ValueError(f"group-wise weights are stored as 4-bit codes; scheme {scheme.name!r} has {scheme.weight_bits}")
    groups, out_shape = scale.shape[lead], scale.shape[lead + 2 :]
    input_shape = q.shape[lead : q.ndim - len(out_shape)]
    qg = q.reshape(*q.shape[:lead], groups, -1, *out_shape)  # [lead, G, N, *out]
    codes = qg - 8 if scheme.zero_point else qg  # -8..7 either way
    out = {"qkernel": packed_int4.pack(codes, lead + 1),  # [lead, G, N/2, *out]
           "group_scale": jnp.squeeze(scale, lead + 1).astype(jnp.float16)}
    if offset is not None:
        out["group_offset"] = jnp.squeeze(offset, lead + 1).astype(jnp.float16)
    out["spec"] = dataclasses.replace(spec_of(scheme), input_shape=tuple(input_shape))
    return out


def integer_codes(p: dict[str, Any], equation: str) -> jnp.ndarray:
    """The integer codes of a quantized projection in the kernel's shape (int8 values:
    -127..127 per channel, -8..7 symmetric 4-bit, 0..15 asymmetric 4-bit)."""
    q, spec = p["qkernel"], p["spec"]
    if spec.group_size is None:
        return q
    n_out = _num_outputs(equation)
    lead = q.ndim - 2 - n_out
    codes = packed_int4.unpack(q, lead + 1)  # [lead, G, N, *out]
    if spec.zero_point:
        codes = codes + 8
    return codes.reshape(*q.shape[:lead], *spec.input_shape, *q.shape[q.ndim - n_out :])


def _num_outputs(equation: str) -> int:
    """How many of the kernel's axes an einsum keeps (its output axes)."""
    lhs, rhs = equation.split("->")[0].split(",")
    return sum(c not in lhs for c in rhs)


def dequantize_kernel(p: dict[str, Any], equation: str) -> jnp.ndarray:
    """The float32 kernel a quantized projection stands for (`equation` is its einsum)."""
    q = integer_codes(p, equation).astype(jnp.float32)
    if "scale" in p:
        return q * p["scale"]
    axes = contracted_axes(equation, q.ndim)
    qg = _grouped(q, axes, p["spec"].group_size)  # [lead, G, N, *out]
    w = qg * jnp.expand_dims(p["group_scale"].astype(jnp.float32), axes[0] + 1)
    if "group_offset" in p:
        w = w + jnp.expand_dims(p["group_offset"].astype(jnp.float32), axes[0] + 1)
    return w.reshape(q.shape)


def round_trip_asymmetric(kernel: jnp.ndarray, equation: str, bits: int, group_size: int) -> jnp.ndarray:
    """The kernel quantized to its stored asymmetric group form and dequantized (QAT's forward)."""
    scheme = Scheme("asym", bits, "", group_size=group_size, zero_point=True)
    q = quantize_kernel(kernel, contracted_axes(equation, kernel.ndim), scheme)
    return dequantize_kernel(q, equation).astype(kernel.dtype)


def projection_paths(params: dict[str, Any], projections: dict[str, str], prefix: str = "") -> dict[str, str]:
    """'layers/q' -> its einsum, for every float projection in the tree."""
    found = {}
    for name, value in params.items():
        path = f"{prefix}{name}"
        if isinstance(value, dict) and "kernel" in value and name in projections:
            found[path] = projections[name]
        elif isinstance(value, dict):
            found.update(projection_paths(value, projections, path + "/"))
    return found


def to_quantize(params: dict[str, Any], projections: dict[str, str], scheme: Scheme) -> dict[str, str]:
    """The projections `scheme` quantizes (path -> einsum): all but those matching keep_float.

    A keep_float pattern that matches no projection is a mistake (a typo would silently
    quantize what was meant to stay float), so it fails naming the valid paths.
    """
    paths = projection_paths(params, projections)
    for pattern in scheme.keep_float:
        if pattern != "lm_head" and not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
            raise ValueError(f"keep-float pattern {pattern!r} matches no projection; projections: {', '.join(paths)}")
    if not scheme.quantizes_weights:
        return {}
    return {p: eq for p, eq in paths.items() if not any(fnmatch.fnmatchcase(p, pat) for pat in scheme.keep_float)}


def is_quantized(params: dict[str, Any]) -> bool:
    return any(getattr(k, "key", None) == "qkernel" for path, _ in jax.tree.flatten_with_path(params)[0] for k in path)


def quantize_params(params: dict[str, Any], projections: dict[str, str], scheme: Scheme, quantize=None) -> dict[str, Any]:
    """A new tree with the projections `scheme` selects quantized (see `to_quantize`).

    quantize(path, kernel, contracted_axes) -> the projection's quantized arrays; round to
    nearest (`quantize_kernel`) unless given (GPTQ passes its own). Everything else is left
    as it is. Raises ValueError for a tree that is already quantized.
    """
    if is_quantized(params):
        raise ValueError("these parameters are already quantized; quantize the float model instead")
    selected = to_quantize(params, projections, scheme)
    quantize = quantize or (lambda path, kernel, axes: quantize_kernel(kernel, axes, scheme))

    def replace(path: str, value: dict[str, Any]) -> dict[str, Any]:
        q = quantize(path, value["kernel"], contracted_axes(selected[path], value["kernel"].ndim))
        return {**q, **({"bias": value["bias"]} if "bias" in value else {})}

    return map_projections(params, selected, replace)


def map_projections(params: dict[str, Any], selected, fn) -> dict[str, Any]:
    """A new tree with fn(path, projection dict) in place of every projection whose path is in `selected`."""

    def walk(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
        out = {}
        for name, value in tree.items():
            path = f"{prefix}{name}"
            if path in selected:
                out[name] = fn(path, value)
            elif isinstance(value, dict):
                out[name] = walk(value, path + "/")
            else:
                out[name] = value
        return out

    return walk(params, "")


def quantized_axes(axes: dict[str, Any], qparams: dict[str, Any]) -> dict[str, Any]:
    """The logical-axes tree of a quantized tree.

    qkernel and a per-channel scale keep the kernel's axes; a group axis takes the name of
    the first input axis it splits (so scales shard along with their integers where sizes allow).
    """
    out = {}
    for name, value in qparams.items():
        if isinstance(value, dict) and "qkernel" in value:
            kernel_axes = axes[name]["kernel"]
            q = {"qkernel": kernel_axes}
            if "scale" in value:
                q["scale"] = kernel_axes
            else:
                lead = 1 if kernel_axes[0] == "layers" else 0
                n_in = len(value["spec"].input_shape)
                group_axes = (*kernel_axes[: lead + 1], *kernel_axes[lead + n_in :])
                q["qkernel"] = (*kernel_axes[: lead + 1], None, *kernel_axes[lead + n_in :])  # [.., G, N/2, *out]
                q["group_scale"] = group_axes
                if "group_offset" in value:
                    q["group_offset"] = group_axes
            q["spec"] = value["spec"]
            if "bias" in value:
                q["bias"] = axes[name]["bias"]
            out[name] = q
        elif isinstance(value, dict):
            out[name] = quantized_axes(axes[name], value)
        else:
            out[name] = axes[name]
    return out


def _integer_dense(p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
    spec: MatmulSpec = p["spec"]
    if spec.group_size is None:
        return aqt_matmul.int_weight_einsum(
            equation, x, p["qkernel"], p["scale"], bits=spec.weight_bits, activation_bits=spec.activation_bits
        )
    # Plain JAX, not AQT: see compress/quant/packed_int4.py for why and what it measured.
    return packed_int4.einsum(x, p["qkernel"], p["group_scale"], p.get("group_offset"),
                              len(spec.input_shape), spec.zero_point)


linear.register_kernel(lambda p: "qkernel" in p, _integer_dense)
