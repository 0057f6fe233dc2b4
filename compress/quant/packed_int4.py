"""Group-wise 4-bit weights packed two to a byte, and their matmul, in plain JAX.

Layout of one projection's codes (a leading stacked-layer axis, where present, stays first):

  qkernel  int8 [G, N/2, *out]   byte j of group g holds the code of input g*N + j in its low
                                 nibble and of input g*N + N/2 + j in its high nibble, each a
                                 two's-complement 4-bit value (-8..7). Asymmetric schemes
                                 store code - 8 (their codes are 0..15).

The inputs are the kernel's contracted axes flattened row-major, G = width / N groups.
Pairing input j with input j + N/2 (rather than 2j with 2j + 1) lets the matmul split x into
its two half-groups and run two dense contractions, with no interleaving of the weights.

Why not jnp.int4 through AQT (compress/quant/aqt_matmul.py): on a CPU, XLA unpacks an int4
array element by element before any matmul reads it. Measured on the development machine
(2 cores) against the AQT path this replaced (commit 7737a72 removed it; a one-off script, not
kept), 30 layers of SmolLM2's gate projection (576 -> 1536, groups of 32) at batch 1:
float32 3.2 ms, int4 through AQT's dot_general with the groups as a batch axis 11.3-13.9 ms,
jnp.int4 dequantized then one matmul 6.2 ms, this layout 3.2 ms; decode of the whole model
with int4-g64 went from 13.7 tokens/s (AQT) to the figures in BENCHMARKS.md. The bytes stay
those of int4, on disk and on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pack(codes: jnp.ndarray, axis: int) -> jnp.ndarray:
    """codes [..., N, ...] (integer values in -8..7, N even along `axis`) -> int8 [..., N/2, ...]."""
    half = codes.shape[axis] // 2
    lo, hi = jnp.split(codes.astype(jnp.int32), [half], axis=axis)
    return (hi * 16 + (lo & 0xF)).astype(jnp.int8)  # hi * 16 + [0, 16) stays within int8


def unpack(packed: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Inverse of `pack`: int8 codes [..., N, ...] in -8..7."""
    lo = jnp.right_shift(jnp.left_shift(packed, 4), 4)  # arithmetic shifts on int8 sign-extend
    hi = jnp.right_shift(packed, 4)
    return jnp.concatenate([lo, hi], axis=axis)


def einsum(
    x: jnp.ndarray,
    packed: jnp.ndarray,
    scale: jnp.ndarray,
    offset: jnp.ndarray | None,
    num_contracted: int,
    zero_point: bool,
) -> jnp.ndarray:
    """x [..., *in] times the weights w = scale * code (+ offset) of one projection: [..., *out].

    packed: int8 [G, N/2, *out] (module docstring); scale, offset: [G, *out]; num_contracted:
    how many trailing axes of x the projection contracts. zero_point: codes are stored minus 8
    (asymmetric schemes), so w = scale * (nibble + 8) + offset.
    """
    groups, half = packed.shape[:2]
    out_shape = packed.shape[2:]
    batch = x.shape[: x.ndim - num_contracted]
    xg = x.reshape(*batch, groups, 2, half)  # [..., G, 2, J]: the two half-groups
    s = scale.reshape(groups, 1, -1).astype(x.dtype)  # [G, 1, O]
    q = packed.reshape(groups, half, -1)  # [G, J, O]
    lo = jnp.right_shift(jnp.left_shift(q, 4), 4).astype(x.dtype) * s  # [G, J, O]
    hi = jnp.right_shift(q, 4).astype(x.dtype) * s
    y = jnp.einsum("...GJ,GJO->...O", xg[..., 0, :], lo, preferred_element_type=jnp.float32)
    y = y + jnp.einsum("...GJ,GJO->...O", xg[..., 1, :], hi, preferred_element_type=jnp.float32)
    if zero_point:  # sum over each group of x, times the group's constant term 8 * scale + offset
        constant = 8.0 * scale.reshape(groups, -1).astype(jnp.float32)
        if offset is not None:
            constant = constant + offset.reshape(groups, -1).astype(jnp.float32)
        sums = jnp.sum(xg, axis=(-2, -1), dtype=jnp.float32)  # [..., G]
        y = y + jnp.einsum("...G,GO->...O", sums, constant)
    return y.reshape(*batch, *out_shape).astype(x.dtype)


def quantize_activations(x: jnp.ndarray, num_contracted: int, group: int) -> jnp.ndarray:
    """x [..., *in] with each group of `group` consecutive inputs (the contracted axes flattened,
    as the weights' groups) rounded to int8 with its own step, max |x| / 127 (1 for a group of
    zeros), ties to even: the w4a8-gN schemes' activations, as the native kernel quantizes them
    (compress/kernels/cpu.cc quantize_row), returned dequantized in x's dtype."""
    batch = x.shape[: x.ndim - num_contracted]
    xg = x.astype(jnp.float32).reshape(*batch, -1, group)
    most = jnp.max(jnp.abs(xg), axis=-1, keepdims=True)
    step = jnp.where(most > 0, most / 127.0, 1.0)
    codes = jnp.clip(jnp.round(xg / step), -127, 127)
    return (codes * step).reshape(x.shape).astype(x.dtype)


def quantize_activations_ste(x: jnp.ndarray, num_contracted: int, group: int) -> jnp.ndarray:
    """quantize_activations with a straight-through gradient (quantization-aware training)."""
    return x + jax.lax.stop_gradient(quantize_activations(x, num_contracted, group) - x)
