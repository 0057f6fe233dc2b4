"""The one matmul every projection goes through.

A projection's parameters are a dict: `{'kernel': w}` plus an optional `'bias'`.
Quantization and adapters change what sits in that dict (integer weights and
scales, low-rank factors), and this module is where the matmul reads them, so
the model code never changes when a transform is applied to its parameters.
"""

from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp

# Later transforms register here: a predicate on the projection dict and the
# function computing `einsum(equation, x, weight)` for it.
_KERNELS: list[tuple[Callable[[dict], bool], Callable[[dict, jnp.ndarray, str], jnp.ndarray]]] = []


def register_kernel(matches: Callable[[dict], bool], compute: Callable[[dict, jnp.ndarray, str], jnp.ndarray]) -> None:
    """Teach `dense` a new weight representation (e.g. quantized or LoRA projections)."""
    _KERNELS.insert(0, (matches, compute))


def dense(p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
    """`einsum(equation, x, kernel) + bias`, in x's dtype.

    Args:
      p: the projection's parameters; `p['kernel']` has the equation's second operand shape.
      x: the activations (first operand).
      equation: e.g. 'BTD,DNH->BTNH'. The bias, if present, has the output's trailing shape.
    """
    for matches, compute in _KERNELS:
        if matches(p):
            y = compute(p, x, equation)
            break
    else:
        if "kernel" not in p:
            raise KeyError(
                f"projection for {equation} has parameters {sorted(p)} and no 'kernel'; for quantized "
                "parameters ('qkernel'), import compress.quant.weights so dense can read them"
            )
        y = jnp.einsum(equation, x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    return y
