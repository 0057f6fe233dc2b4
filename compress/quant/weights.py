"""Quantizing a parameter tree: a pure transform from float kernels to integer kernels plus scales.

A quantized projection is `{'qkernel': int8 [kernel shape], 'scale': float32 [kernel shape,
contracted axes of size 1], 'bias'?}`; `compress.models.linear.dense` recognises it and runs
its matmul on the integers (compress/quant/aqt_matmul.py). Logical axes carry over, so the
sharding table places quantized trees like float ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from compress.models import linear
from compress.quant import aqt_matmul
from compress.quant.schemes import Scheme


def contracted_axes(equation: str, kernel_ndim: int) -> tuple[int, ...]:
    """Kernel axes an einsum contracts; a leading extra axis (stacked layers) is never contracted."""
    lhs, rhs = equation.split("->")[0].split(",")
    offset = kernel_ndim - len(rhs)
    if offset not in (0, 1):
        raise ValueError(f"a kernel of {kernel_ndim} axes does not fit {equation}")
    return tuple(offset + i for i, c in enumerate(rhs) if c in lhs)


def quantize_kernel(kernel: jnp.ndarray, axes: tuple[int, ...], scheme: Scheme) -> dict[str, jnp.ndarray]:
    """Symmetric round-to-nearest: one scale per slice over `axes` (per output channel)."""
    w = kernel.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / scheme.qmax
    scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w / scale), -scheme.qmax, scheme.qmax).astype(jnp.int8)
    return {"qkernel": q, "scale": scale}


def dequantize_kernel(p: dict[str, jnp.ndarray]) -> jnp.ndarray:
    return p["qkernel"].astype(jnp.float32) * p["scale"]


def quantize_params(params: dict[str, Any], projections: dict[str, str], scheme: Scheme) -> dict[str, Any]:
    """A new tree with every projection named in `projections` (name -> einsum) quantized.

    Projections in `scheme.keep_float`, and everything that is not a projection, are left
    as they are. Raises ValueError for a tree that is already quantized.
    """
    if any(k == "qkernel" for path, _ in jax.tree.flatten_with_path(params)[0] for k in _keys(path)):
        raise ValueError("these parameters are already quantized; quantize the float model instead")

    def walk(tree: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in tree.items():
            if isinstance(value, dict) and "kernel" in value and name in projections and name not in scheme.keep_float:
                q = quantize_kernel(value["kernel"], contracted_axes(projections[name], value["kernel"].ndim), scheme)
                out[name] = {**q, **({"bias": value["bias"]} if "bias" in value else {})}
            elif isinstance(value, dict):
                out[name] = walk(value)
            else:
                out[name] = value
        return out

    return walk(params)


def quantized_axes(axes: dict[str, Any], qparams: dict[str, Any]) -> dict[str, Any]:
    """The logical-axes tree of a quantized tree: qkernel and scale keep the kernel's axes."""
    out = {}
    for name, value in qparams.items():
        if isinstance(value, dict) and "qkernel" in value:
            out[name] = {"qkernel": axes[name]["kernel"], "scale": axes[name]["kernel"]}
            if "bias" in value:
                out[name]["bias"] = axes[name]["bias"]
        elif isinstance(value, dict):
            out[name] = quantized_axes(axes[name], value)
        else:
            out[name] = axes[name]
    return out


def _keys(path) -> list[str]:
    return [getattr(k, "key", None) for k in path]


def _integer_dense(p: dict[str, jnp.ndarray], x: jnp.ndarray, equation: str) -> jnp.ndarray:
    return aqt_matmul.int_weight_einsum(equation, x, p["qkernel"], p["scale"], bits=8)


linear.register_kernel(lambda p: "qkernel" in p, _integer_dense)
