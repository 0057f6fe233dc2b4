"""The one matmul every projection goes through.

A projection's parameters are a dict: `{'kernel': w}` plus an optional `'bias'`.
Quantization and adapters change what sits in that dict (integer weights and
scales, low-rank factors), and this module is where the matmul reads them, so
the model code never changes when a transform is applied to its parameters.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def dense(p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
    """`einsum(equation, x, kernel) + bias`, in x's dtype.

    Args:
      p: the projection's parameters: a float `p['kernel']` with the equation's second operand
        shape, or arrays described by a static `p['spec']` whose `einsum(p, x, equation)`
        computes the product from them (quantized weights, fake-quantized training: see
        compress/quant/matmul.py). The kernel travels with the parameters, so nothing needs
        registering and no import order matters. A static `p['lora']` adds a low-rank
        adapter's `scale * x A B` to whichever of the two computed the base.
      x: the activations (first operand).
      equation: e.g. 'BTD,DNH->BTNH'. The bias, if present, has the output's trailing shape.
    """
    spec = p.get("spec")
    if spec is not None:
        y = spec.einsum(p, x, equation)
    elif "kernel" in p:
        y = jnp.einsum(equation, x, p["kernel"].astype(x.dtype))
    else:
        raise KeyError(f"projection for {equation} has parameters {sorted(p)}: neither a float 'kernel' "
                       "nor a 'spec' saying how to read its arrays")
    if "bias" in p:
        y = y + p["bias"].astype(y.dtype)
    lora = p.get("lora")
    if lora is not None:  # a low-rank adapter beside the base weights (compress/adapters/lora.py)
        y = y + lora.apply(p, x, equation)
    return y
