"""The matmul of a quantized projection, carried by the projection itself.

A quantized (or fake-quantized) projection dict holds a `spec`: a static MatmulSpec that
says how its arrays are read and computes `einsum(equation, x, weight)` from them.
`compress.models.linear.dense` calls `p["spec"].einsum(p, x, equation)` whenever a spec is
present, so the kernel travels with the parameters: loading an int8/int4 model needs no
registration and does not depend on which module was imported first.

Kernels:
  per output channel (int8, w8a8)   AQT's dg_core on the stored int8 weights (aqt_matmul.py)
  group-wise 4-bit                  two half-group contractions on packed codes (packed_int4.py)
  fake (QAT)                        AQT's training dot_general on a float kernel (aqt_matmul.py)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from compress.quant import aqt_matmul, grid, packed_int4
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

    def einsum(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        """einsum(equation, x, the weight p stands for), computed from p's stored arrays (no bias)."""
        if self.fake:
            return aqt_matmul.fake_quant_einsum(equation, x, p["kernel"], self.weight_bits, self.group_size,
                                                self.zero_point, self.activation_bits)
        if self.group_size is None:
            return aqt_matmul.int_weight_einsum(equation, x, p["qkernel"], p["scale"], bits=self.weight_bits,
                                                activation_bits=self.activation_bits)
        # Plain JAX, not AQT: see compress/quant/packed_int4.py for why and what it measured.
        return packed_int4.einsum(x, p["qkernel"], p["group_scale"], p.get("group_offset"),
                                  len(self.input_shape), self.zero_point)

    def take(self, p: dict[str, Any], ids: jnp.ndarray) -> jnp.ndarray:
        """Columns `ids` of a stored kernel [in, V] with one contracted axis, dequantized: float32
        [*ids.shape, in]. A quantized embedding table is stored as the tied head's kernel (its
        transpose), so a lookup reads only the integers of the rows it needs."""
        if self.fake or (self.input_shape is not None and len(self.input_shape) != 1):
            raise ValueError("take reads the columns of a stored [in, V] kernel")
        if self.group_size is None:
            w = jnp.take(p["qkernel"], ids, axis=1).astype(jnp.float32) * jnp.take(p["scale"], ids, axis=1)
        else:
            codes = grid.unpack_groups(jnp.take(p["qkernel"], ids, axis=2), 0, self.zero_point)  # [G, N, *ids]
            w = codes.astype(jnp.float32) * jnp.take(p["group_scale"], ids, axis=1)[:, None].astype(jnp.float32)
            if "group_offset" in p:
                w = w + jnp.take(p["group_offset"], ids, axis=1)[:, None].astype(jnp.float32)
            w = w.reshape(-1, *ids.shape)
        return jnp.moveaxis(w, 0, -1)


def spec_of(scheme: Scheme) -> MatmulSpec:
    """The spec of a scheme's stored projections (group-wise ones add their input shape)."""
    return MatmulSpec(scheme.weight_bits, scheme.group_size, scheme.zero_point, scheme.activation_bits)
