"""Quantizing a parameter tree: a pure transform from float kernels to integer kernels plus scales.

A quantized projection is a dict whose static `spec` (compress/quant/matmul.py) runs its
matmul on the integers when `compress.models.linear.dense` meets it; logical axes carry over, so the
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

  the embedding table (an embed-* option; `quantize_embeddings`)
    embed  the projection dict of its transpose [D, V], the tied LM head's kernel, in one
           of the layouts above (a scale, or a group's, per vocabulary entry): the head's
           matmul reads it through `dense`, a lookup through `spec.take`, so it is stored once

plus the float `bias`, if any. The spec is part of the tree's structure, not its data, so
jit, scan and sharding carry it along for free.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import jax
import jax.numpy as jnp

from compress.errors import InputError
from compress.quant import grid
from compress.quant.matmul import spec_of
from compress.quant.schemes import Scheme


def quantize_kernel(kernel: jnp.ndarray, axes: tuple[int, ...], scheme: Scheme) -> dict[str, Any]:
    """Round-to-nearest quantization of one kernel whose input axes are `axes`."""
    w = kernel.astype(jnp.float32)
    if scheme.group_size is None:
        scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / scheme.qmax
        scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
        q = jnp.clip(jnp.round(w / scale), -scheme.qmax, scheme.qmax).astype(jnp.int8)
        return {"qkernel": q, "scale": scale, "spec": spec_of(scheme)}
    codes, scale, offset = grid.nearest_groups(w, axes, scheme)
    return grouped_projection(codes, scale, offset, axes[0], scheme)


def grouped_projection(codes: jnp.ndarray, scale: jnp.ndarray, offset: jnp.ndarray | None, lead: int,
                       scheme: Scheme) -> dict[str, Any]:
    """The stored projection of group-wise codes (the kernel's shape) on a [lead, G, 1, *out] grid:
    the packed arrays of `grid.pack_groups` and their spec (with the kernel's input shape)."""
    n_out = scale.ndim - lead - 2
    input_shape = tuple(codes.shape[lead : codes.ndim - n_out])
    spec = dataclasses.replace(spec_of(scheme), input_shape=input_shape)
    return {**grid.pack_groups(codes, scale, offset, lead, scheme), "spec": spec}


def integer_codes(p: dict[str, Any], equation: str) -> jnp.ndarray:
    """The integer codes of a quantized projection in the kernel's shape (int8 values:
    -127..127 per channel, -8..7 symmetric 4-bit, 0..15 asymmetric 4-bit)."""
    q, spec = p["qkernel"], p["spec"]
    if spec.group_size is None:
        return q
    n_out = grid.output_axes_count(equation)
    lead = q.ndim - 2 - n_out
    codes = grid.unpack_groups(q, lead, spec.zero_point)  # [lead, G, N, *out]
    return codes.reshape(*q.shape[:lead], *spec.input_shape, *q.shape[q.ndim - n_out :])


def dequantize_kernel(p: dict[str, Any], equation: str) -> jnp.ndarray:
    """The float32 kernel a quantized projection stands for (`equation` is its einsum)."""
    q = integer_codes(p, equation).astype(jnp.float32)
    if "scale" in p:
        return q * p["scale"]
    axes = grid.contracted_axes(equation, q.ndim)
    qg = grid.grouped(q, axes, p["spec"].group_size)  # [lead, G, N, *out]
    w = qg * jnp.expand_dims(p["group_scale"].astype(jnp.float32), axes[0] + 1)
    if "group_offset" in p:
        w = w + jnp.expand_dims(p["group_offset"].astype(jnp.float32), axes[0] + 1)
    return w.reshape(q.shape)


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
            raise InputError(f"keep-float pattern {pattern!r} matches no projection; projections: {', '.join(paths)}")
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
        raise InputError("these parameters are already quantized; quantize the float model instead")
    selected = to_quantize(params, projections, scheme)
    quantize = quantize or (lambda path, kernel, axes: quantize_kernel(kernel, axes, scheme))

    def replace(path: str, value: dict[str, Any]) -> dict[str, Any]:
        q = quantize(path, value["kernel"], grid.contracted_axes(selected[path], value["kernel"].ndim))
        return {**q, **({"bias": value["bias"]} if "bias" in value else {})}

    out = map_projections(params, selected, replace)
    return quantize_embeddings(out, scheme.embed) if scheme.embed is not None else out


def quantize_embeddings(params: dict[str, Any], scheme: Scheme) -> dict[str, Any]:
    """The embedding table and a float LM head (untied) rounded to nearest on `scheme`'s grid.

    The table [V, D] is stored as its transpose [D, V], the tied head's kernel: one scale (or
    one per group of D) per vocabulary entry, so the one stored array serves both the lookup
    (`MatmulSpec.take` reads the rows it needs) and the tied head's matmul (`dense`).
    """
    table = params.get("embed")
    if table is None or isinstance(table, dict) or table.ndim != 2:
        raise InputError("an embed-* scheme quantizes a decoder's float embedding table [vocab, embed]; "
                         "this tree has none")
    out = {**params, "embed": quantize_kernel(jnp.swapaxes(table, 0, 1), (0,), scheme)}
    head = params.get("lm_head")
    if isinstance(head, dict) and "kernel" in head:
        out["lm_head"] = {**quantize_kernel(head["kernel"], (0,), scheme), **({"bias": head["bias"]} if "bias" in head else {})}
    return out


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
            # a quantized embedding table is stored as its transpose, the tied head's kernel
            kernel_axes = axes[name]["kernel"] if isinstance(axes[name], dict) else tuple(reversed(axes[name]))
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
