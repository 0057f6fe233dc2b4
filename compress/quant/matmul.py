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
  a few rows on a CPU (decoding)    native kernels that stream the integers once (compress/kernels/cpu.py),
                                    for weight-only int8 and int4 when at most 64 rows of
                                    activations meet them, and for w8a8 on integer dot products
                                    (AVX-512 VNNI, where the CPU has it: AQT's per-token numerics);
                                    gradients go through the plain path's.
                                    `native=False` (any multi-device placement: the custom call
                                    has no sharding rule) keeps the plain path.
  float weights in decode steps     FloatSpec, which `native_float` gives a float model's
                                    projections for serving on a CPU: float32 weights streamed
                                    once by the same kernels (XLA's dot of a few rows against a
                                    layer of a stack runs at a quarter of the read rate).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from compress.kernels import cpu as cpu_kernels
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
    native: bool = True  # small-batch matmuls on a CPU may run the native kernels (single-device placement)
    tiled: bool = False  # qkernel's codes in the kernels' tiled layout (`tile`, by `native_float`)
    activation_group: int | None = None  # w8a8-gN: inputs per activation step (int8 weights per output)

    @property
    def rounding_group(self) -> int | None:
        """Inputs per step of the activations' int8 rounding before an integer-weight product
        (w4a8: its weight groups; w8a8-gN: activation_group), or None (w8a8 rounds per token, in AQT)."""
        if self.activation_group is not None:
            return self.activation_group
        return self.group_size if self.activation_bits is not None else None

    @property
    def whole_keys(self) -> tuple[str, ...]:
        """Arrays the layer scan hands over whole, with the layer's index (compress/models/layer_scan.py):
        the native kernels read a layer from the stack in place, where a sliced operand would be
        copied out of it on every step."""
        if not self.native or self.fake:
            return ()
        if self.activation_bits is None or self.rounding_group is not None:  # w4a8, w8a8-gN: their own or int4's/int8's
            return _STORED
        w8a8 = self.activation_bits == 8 and self.weight_bits == 8
        return _STORED if w8a8 and cpu_kernels.has_w8a8() else ()

    def einsum(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        """einsum(equation, x, the weight p stands for), computed from p's stored arrays (no bias).
        With p["layer"], p's stored arrays are whole stacks and the layer's matmul is computed."""
        layer = p.get("layer")
        if self.whole_keys:
            shape = _native_shape(self, p, x, equation, stacked=layer is not None)
            if shape is not None:
                return _native_einsum(self, equation, shape, _stored(p), x, 0 if layer is None else layer,
                                      p.get("after"))
        if layer is not None:  # the plain path reads the layer's slice
            p = {k: jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False) if k in _STORED else v
                 for k, v in p.items() if k not in ("layer", "after")}
        return self.plain_einsum(p, x, equation)

    def plain_einsum(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        """`einsum` in plain JAX (AQT, packed int4), for any batch and placement."""
        activation_bits = self.activation_bits
        if self.rounding_group is not None:  # w4a8, w8a8-gN: x rounded per group first
            n_in = _contracted(equation)[2]
            x = (packed_int4.quantize_activations_ste if self.fake else packed_int4.quantize_activations)(
                x, n_in, self.rounding_group)
            activation_bits = None
        if self.fake:
            return aqt_matmul.fake_quant_einsum(equation, x, p["kernel"], self.weight_bits, self.group_size,
                                                self.zero_point, activation_bits)
        if self.group_size is None:
            q = p["qkernel"]
            if self.tiled:  # one layer's (einsum slices the stack first)
                n_in = _contracted(equation)[2]
                q = w8a8g_tile(q, n_in, self.activation_group, inverse=True) if self.activation_group \
                    else tile(q, n_in, inverse=True)
            return aqt_matmul.int_weight_einsum(equation, x, q, p["scale"], bits=self.weight_bits,
                                                activation_bits=activation_bits)
        # Plain JAX, not AQT: see compress/quant/packed_int4.py for why and what it measured.
        q = p["qkernel"]  # [G, S/2, *outputs]
        if self.tiled:
            q = w4a8_tile(q, inverse=True) if self.activation_bits else tile(q, 2, rows=q.shape[1], inverse=True)
        return packed_int4.einsum(x, q, p["group_scale"], p.get("group_offset"), len(self.input_shape),
                                  self.zero_point)

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


_STORED = ("qkernel", "scale", "group_scale", "group_offset")


def _contracted(equation: str) -> tuple[str, str, int]:
    """An einsum's (x's letters, the kernel's letters, how many of the kernel's it contracts)."""
    lhs, rhs = equation.split("->")[0].split(",")
    return lhs, rhs, sum(c in lhs for c in rhs)


def _stored(p: dict[str, Any]) -> dict[str, jnp.ndarray]:
    return {k: p[k] for k in _STORED if k in p}


def _native_shape(spec: MatmulSpec, p: dict[str, Any], x: jnp.ndarray, equation: str,
                  stacked: bool) -> tuple[int, ...] | None:
    """(rows M, inputs K, outputs N, contracted axes) of a matmul the native kernels take, or None.
    stacked: the arrays have a leading axis of layers (the layer scan's whole stack)."""
    _, rhs, n_in = _contracted(equation)
    lead = int(stacked)
    q = p["qkernel"]
    if spec.group_size is None:
        if q.ndim != len(rhs) + lead:  # an unexpected leading axis: not one matmul
            return None
        k, n = math.prod(q.shape[lead : lead + n_in]), math.prod(q.shape[lead + n_in :])
    else:
        if q.ndim != 2 + len(rhs) - n_in + lead:
            return None
        k, n = 2 * q.shape[lead] * q.shape[lead + 1], math.prod(q.shape[lead + 2 :])
    m = math.prod(x.shape[: x.ndim - n_in])
    if spec.activation_bits is not None and spec.rounding_group is None:
        usable = cpu_kernels.w8a8_usable(m, k, n)
    else:
        usable = cpu_kernels.usable(m, n)
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16) or not usable:
        return None
    return m, k, n, n_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _native_einsum(spec: MatmulSpec, equation: str, shape: tuple[int, ...], stored: dict, x: jnp.ndarray, layer,
                   after=None):
    """The native kernel's matmul of layer `layer` of the stored arrays (a stack of layers: their
    leading axis; else a single kernel at layer 0). after: (codes stack, layer) the model reads
    next, for the kernel to prefetch (compress/models/layer_scan.py), or None."""
    m, k, n, n_in = shape
    q = stored["qkernel"]
    stacked = _is_stack(spec, q, n_in, equation)
    layers = q.shape[0] if stacked else 1
    out_dims = q.shape[int(stacked) + (n_in if spec.group_size is None else 2) :]
    if spec.activation_bits is not None and spec.rounding_group is None:  # w8a8: int8 activations per row
        y = cpu_kernels.w8a8_matmul(x.reshape(m, k), q.reshape(layers, k, n), stored["scale"].reshape(layers, n), layer)
    elif spec.activation_group is not None and spec.tiled:  # w8a8-gN on integer dot products
        y = cpu_kernels.w8a8g_matmul(x.reshape(m, k), q.reshape(layers, k, n), stored["scale"].reshape(layers, n),
                                     spec.activation_group, layer, after)
    elif spec.activation_group is not None:  # w8a8-gN without them: the same rounded activations, float products
        y = cpu_kernels.int8_matmul(packed_int4.quantize_activations(x.reshape(m, k), 1, spec.activation_group),
                                    q.reshape(layers, k, n), stored["scale"].reshape(layers, n), layer, after)
    elif spec.group_size is None:
        y = cpu_kernels.int8_matmul(x.reshape(m, k), q.reshape(layers, k, n), stored["scale"].reshape(layers, n), layer,
                                    after, tiled=spec.tiled)
    else:
        offset = stored.get("group_offset")
        groups, half = q.shape[int(stacked)], q.shape[int(stacked) + 1]
        operands = (q.reshape(layers, groups, half, n), stored["group_scale"].reshape(layers, groups, n),
                    None if offset is None else offset.reshape(layers, groups, n), spec.zero_point, layer, after)
        rows = x.reshape(m, k)
        if spec.activation_bits is not None and spec.tiled:  # w4a8 on integer dot products
            y = cpu_kernels.w4a8_matmul(rows, *operands)
        elif spec.activation_bits is not None:  # w4a8 without them: the same rounded activations, float products
            y = cpu_kernels.int4_matmul(packed_int4.quantize_activations(rows, 1, spec.group_size), *operands)
        else:
            y = cpu_kernels.int4_matmul(rows, *operands, tiled=spec.tiled)
    return y.reshape(*x.shape[: x.ndim - n_in], *out_dims).astype(x.dtype)


def _is_stack(spec: MatmulSpec, q: jnp.ndarray, n_in: int, equation: str) -> bool:
    """Whether q carries a leading axis of stacked layers beyond the einsum's kernel axes."""
    rhs = _contracted(equation)[1]
    kernel_ndim = len(rhs) if spec.group_size is None else 2 + len(rhs) - n_in
    return q.ndim == kernel_ndim + 1


def _native_fwd(spec, equation, shape, stored, x, layer, after=None):
    return _native_einsum(spec, equation, shape, stored, x, layer, after), (stored, x, layer)


def _native_bwd(spec, equation, shape, residuals, g):
    stored, x, layer = residuals  # the gradient to x is the plain path's (its own custom VJP for AQT)
    if _is_stack(spec, stored["qkernel"], shape[3], equation):
        stored = {k: jax.lax.dynamic_index_in_dim(v, layer, 0, keepdims=False) for k, v in stored.items()}
    _, vjp = jax.vjp(lambda x: spec.plain_einsum(stored, x, equation), x)
    return None, vjp(g)[0], None, None


_native_einsum.defvjp(_native_fwd, _native_bwd)


# Rows up to which the float kernel beats XLA's dot (benchmarks/float_kernel.py), by the path the
# kernels' library runs: on 2 Zen 4 cores (AVX-512), on SmolLM2's projections 5.5-7.5x at one row,
# 1.0-2.4x at 24, 0.65-0.88x at 64, where the rows make it compute-bound and XLA's blocked matmul
# reuses the weights better; on 2 Zen 2 cores (AVX2) 2.0-2.7x at 16, 1.2-1.6x at 32, 40 and 64,
# so there every row count the kernel takes (a serving step's rows plus a prompt chunk: 12 rows
# with a 16-token chunk took 161 ms against 251 on XLA's dot, benchmarks/step_buckets.py). Elsewhere
# (the portable C++ path) 24, unmeasured.
FLOAT_ROWS = {"AVX-512": 24, "AVX2": cpu_kernels.MAX_ROWS}
FLOAT_ROWS_ELSEWHERE = 24


def float_rows() -> int:
    """Rows of activations up to which a float32 matmul takes the float kernel on this CPU."""
    return FLOAT_ROWS.get(cpu_kernels.instruction_set(), FLOAT_ROWS_ELSEWHERE)


# bfloat16 weights take the kernel at every row count it has (cpu_kernels.MAX_ROWS): XLA's dot
# converts each layer to float32 first, and a 48- or 64-row step of SmolLM2 took 276 and 302 ms
# there against 118 and 146 on the kernel (one run, 2 Zen 4 cores; 32 rows: 76 against 69).
BF16_ROWS = cpu_kernels.MAX_ROWS


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FloatSpec:
    """The matmul of a float projection in a model served on a CPU (`native_float`): float32
    activations of 1 to `float_rows()` rows against its float32 kernel (BF16_ROWS against a
    bfloat16 one) on the native kernel, read in place from the layer stack (`whole_keys`);
    anything else (prefill, larger batches, other dtypes) is XLA's einsum of the same numbers.
    Gradients are the plain einsum's, to the kernel as well.

    tiled: the kernel's numbers are stored in the kernels' tiled layout (`tile`; its shape is
    unchanged), which the native kernel streams in order and the plain path undoes first."""

    tiled: bool = False

    @property
    def whole_keys(self) -> tuple[str, ...]:
        """What each layer of the scan gets whole, with its index (compress/models/layer_scan.py)."""
        return ("kernel",)

    def einsum(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        kernel, layer = p["kernel"], p.get("layer")
        _, rhs, n_in = _contracted(equation)
        lead = int(layer is not None)
        m = math.prod(x.shape[: x.ndim - n_in])
        k, n = math.prod(kernel.shape[lead : lead + n_in]), math.prod(kernel.shape[lead + n_in :])
        rows = float_rows() if kernel.dtype == jnp.float32 else BF16_ROWS
        if (x.dtype == jnp.float32 and kernel.dtype in cpu_kernels.FLOAT_WEIGHTS and kernel.ndim == len(rhs) + lead
                and m <= rows and cpu_kernels.usable(m, n)):
            return _float_native(equation, (m, k, n, n_in, bool(lead), self.tiled), kernel, x,
                                 0 if layer is None else layer, p.get("after"))
        return _float_plain(equation, kernel, x, layer, self.tiled)

    def take(self, p: dict[str, Any], ids: jnp.ndarray) -> jnp.ndarray:
        """Columns `ids` of the kernel [D, V]: the rows of a tied embedding table that
        `native_float` stored as its head's kernel, [*ids.shape, D] in the kernel's dtype."""
        return jnp.moveaxis(jnp.take(p["kernel"], ids, axis=1), 0, -1)


TILE_ROWS, TILE_COLS = 16, 64  # compress/kernels/cpu.cc kTileRows, kTileCols


def _permuted(q: jnp.ndarray, lead: int, blocks: tuple[int, ...], order: tuple[int, ...],
              inverse: bool) -> jnp.ndarray:
    """q [*lead, ...] viewed as [*lead, *blocks] with the blocks' axes put in `order` (inverse: a
    tiled q put back), its shape kept: every layout below is one such permutation."""
    if inverse:
        blocks, order = tuple(blocks[i] for i in order), tuple(order.index(i) for i in range(len(order)))
    axes = (*range(lead), *(lead + i for i in order))
    return jnp.transpose(q.reshape(*q.shape[:lead], *blocks), axes).reshape(q.shape)


def tile(kernel: jnp.ndarray, n_in: int, lead: int = 0, inverse: bool = False, rows: int = TILE_ROWS) -> jnp.ndarray:
    """A kernel's numbers in the CPU kernels' tiled layout (inverse: back), its shape kept.
    Viewed as [*lead axes, K, N] (the first n_in axes after the lead ones are contracted), it
    becomes [*lead, K / rows, N / 64, rows, 64]: each rows x 64 tile the kernel reads is one
    contiguous run (compress/kernels/cpu.cc says what it measured). Float and int8 kernels take
    tiles of 16 rows; packed int4 codes [G, S/2, N], tiles of a group's S/2 byte rows."""
    k, n = math.prod(kernel.shape[lead : lead + n_in]), math.prod(kernel.shape[lead + n_in :])
    return _permuted(kernel, lead, (k // rows, rows, n // TILE_COLS, TILE_COLS), (0, 2, 1, 3), inverse)


def w4a8_tile(q: jnp.ndarray, lead: int = 0, inverse: bool = False) -> jnp.ndarray:
    """Packed int4 codes [*lead, G, J, *outputs] (J = S/2 byte rows a group) in the w4a8
    kernel's tiled layout (inverse: back), the shape kept: `tile`'s runs of a group's J byte rows
    of 64 columns, each ordered [J/4, 4 vectors of 16 columns, 16 columns, 4 byte rows], so that
    one 32-bit lane holds four byte rows of one column (compress/kernels/cpu.cc, w4a8)."""
    g, j, n = q.shape[lead], q.shape[lead + 1], math.prod(q.shape[lead + 2 :])
    # [G, J/4, 4, N/64, 4, 16] -> [G, N/64, J/4, 4, 16, 4]
    return _permuted(q, lead, (g, j // 4, 4, n // TILE_COLS, 4, 16), (0, 3, 1, 4, 5, 2), inverse)


def tileable_columns(n: int) -> bool:
    """Whether n outputs make whole tiles of the kernels' narrow path (the wide one splits columns)."""
    return n % TILE_COLS == 0 and n < cpu_kernels.WIDE


def w8a8g_tile(q: jnp.ndarray, n_in: int, group: int, lead: int = 0, inverse: bool = False) -> jnp.ndarray:
    """int8 codes [*lead, *inputs, *outputs] (the first n_in axes after the lead ones contracted,
    K of them) in the w8a8-gN kernel's tiled layout (inverse: back), the shape kept: each group of
    `group` inputs, per 64 columns, one run [group/4 quads][64 columns][4 inputs], so that one
    32-bit lane holds four inputs of one column (compress/kernels/cpu.cc, w8a8-gN)."""
    k, n = math.prod(q.shape[lead : lead + n_in]), math.prod(q.shape[lead + n_in :])
    # [G, quads, 4, N/64, 64] -> [G, N/64, quads, 64, 4]
    return _permuted(q, lead, (k // group, group // 4, 4, n // TILE_COLS, TILE_COLS), (0, 3, 1, 4, 2), inverse)


def w8a8g_tileable(group: int, k: int, n: int) -> bool:
    """Whether the w8a8-gN kernel takes int8 codes [k, n] with activation groups of `group` inputs."""
    return group % 4 == 0 and k % group == 0 and tileable_columns(n) and cpu_kernels.has_w8a8g()


def w4a8_tileable(group: int, n: int) -> bool:
    """Whether the w4a8 kernel takes packed codes of groups of `group` inputs and n outputs."""
    return group % 8 == 0 and tileable_columns(n) and cpu_kernels.has_w4a8()


def tileable(k: int, n: int) -> bool:
    """Whether the kernels take a [k, n] matrix tiled: whole tiles, narrower than the wide path."""
    return k % TILE_ROWS == 0 and tileable_columns(n)


def _float_plain(equation: str, kernel: jnp.ndarray, x: jnp.ndarray, layer, tiled: bool = False) -> jnp.ndarray:
    if layer is not None:
        kernel = jax.lax.dynamic_index_in_dim(kernel, layer, 0, keepdims=False)
    if tiled:
        kernel = tile(kernel, _contracted(equation)[2], inverse=True)
    return jnp.einsum(equation, x, kernel.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _float_native(equation: str, shape: tuple[int, ...], kernel: jnp.ndarray, x: jnp.ndarray, layer, after=None):
    """The native kernel's x @ kernel[layer] (a stack of layers, or one kernel at layer 0).
    shape: (rows M, inputs K, outputs N, contracted axes, whether kernel is a stack, whether tiled)."""
    m, k, n, n_in, stacked, tiled = shape
    out_dims = kernel.shape[int(stacked) + n_in :]
    w = kernel.reshape(kernel.shape[0] if stacked else 1, k, n)
    y = cpu_kernels.f32_matmul(x.reshape(m, k), w, layer, after, tiled=tiled)
    return y.reshape(*x.shape[: x.ndim - n_in], *out_dims)


def _float_native_fwd(equation, shape, kernel, x, layer, after=None):
    return _float_native(equation, shape, kernel, x, layer, after), (kernel, x, layer)


def _float_native_bwd(equation, shape, residuals, g):
    kernel, x, layer = residuals
    _, vjp = jax.vjp(lambda w, x: _float_plain(equation, w, x, layer if shape[4] else None, shape[5]), kernel, x)
    dw, dx = vjp(g)
    return dw, dx, None, None


_float_native.defvjp(_float_native_fwd, _float_native_bwd)


def native_float(params: Any, projections: dict[str, str] | None = None,
                 own_layouts: dict[str, str] | None = None, float_table: bool | None = None) -> Any:
    """`params` with a FloatSpec on every float projection without a spec (a dict holding a float
    `kernel`), for decoding on a CPU where the native kernels are built; unchanged elsewhere, or
    with PRESS_FLOAT_KERNELS=0 (XLA's dot, to compare).

    projections: {name: einsum equation} of the model's projections (decoder.PROJECTIONS): those
    the kernels can take tiled, float, int8 or packed int4 (weight-only), are stored in their
    tiled layout (`tile`), a copy made here (PRESS_TILED_WEIGHTS=0 keeps rows).
    own_layouts: the same for projections whose integer kernel reads only a layout of its own
    (w4a8: `w4a8_tile`, w8a8-gN: `w8a8g_tile`), stored in it for an engine of any width (the
    plain path undoes it).

    A decoder's tied float embedding table (`embed` [V, D] without an `lm_head`) becomes the
    head's kernel, its transpose [D, V] with a FloatSpec, as `press quantize` stores a quantized
    table (compress/models/decoder.py reads either): the kernels read [K, N] weights, and XLA's
    dot of `x @ table.T` converted a bfloat16 table to a float32 copy (113 MB written and read)
    at every step, and streamed an fp32 one at ~30 GB/s. A lookup reads the columns it needs. An
    fp32 table moves only where `float_table` says (None: with `projections`, engines of few rows):
    a batch-1 step took 0.91x the time with it, and a step of 2 rows 0.72x, of 4 rows 0.87x (the
    engine's own choice, serve/engine.py FLOAT_TABLE_SLOTS), but beside the server's own threads
    under the hostile-client benchmark (16 slots) the well-behaved p95 ratio was 1.88-2.24x in
    three runs with it, 1.46-1.51x in two without (BENCHMARKS.md, "Hostile clients")."""
    if not cpu_kernels.available():
        return params
    floats = os.environ.get("PRESS_FLOAT_KERNELS", "1") != "0"
    tiling = projections if os.environ.get("PRESS_TILED_WEIGHTS", "1") != "0" else None
    own = {**(own_layouts or {}), **(tiling or {})} if os.environ.get("PRESS_TILED_WEIGHTS", "1") != "0" else {}
    table = params.get("embed") if isinstance(params, dict) else None
    if floats and "lm_head" not in params and hasattr(table, "dtype") and table.ndim == 2 \
            and table.dtype in cpu_kernels.FLOAT_WEIGHTS \
            and (table.dtype != jnp.float32 or (projections is not None if float_table is None else float_table)):
        params = {**params, "embed": {"kernel": table.T, "spec": FloatSpec()}}

    def shape_of(equation, array):
        """(contracted axes, lead axes, K, N) of a projection's [*lead, *inputs, *outputs] array."""
        _, rhs, n_in = _contracted(equation)
        lead = array.ndim - len(rhs)
        return n_in, lead, math.prod(array.shape[lead : lead + n_in]), math.prod(array.shape[lead + n_in :])

    def tiled_shape(name, array):
        """(contracted axes, lead axes) of a projection the kernels can take tiled, or None."""
        if (tiling or {}).get(name) is None:
            return None
        n_in, lead, k, n = shape_of(tiling[name], array)
        return (n_in, lead) if lead in (0, 1) and tileable(k, n) else None

    def walk(node, name=None):
        if not isinstance(node, dict):
            return node
        kernel, spec = node.get("kernel"), node.get("spec")
        if floats and spec is None and hasattr(kernel, "dtype") and jnp.issubdtype(kernel.dtype, jnp.floating) \
                and kernel.ndim >= 2:
            axes = tiled_shape(name, kernel) if kernel.dtype in cpu_kernels.FLOAT_WEIGHTS else None
            if axes is None:
                return {**node, "spec": FloatSpec()}
            return {**node, "kernel": tile(kernel, *axes), "spec": FloatSpec(tiled=True)}
        w4a8 = isinstance(spec, MatmulSpec) and spec.group_size is not None and spec.activation_bits is not None
        w8a8g = isinstance(spec, MatmulSpec) and spec.activation_group is not None
        if isinstance(spec, MatmulSpec) and spec.native and not spec.fake and not spec.tiled \
                and (spec.activation_bits is None or w4a8 or w8a8g) \
                and (own if w4a8 or w8a8g else tiling or {}).get(name) is not None:
            q = node["qkernel"]
            if w8a8g:  # its own layout where its kernel runs; else rows (the int8 kernel on rounded activations)
                n_in, lead, k, n = shape_of(own[name], q)
                if lead in (0, 1) and w8a8g_tileable(spec.activation_group, k, n):
                    return {**node, "qkernel": w8a8g_tile(q, n_in, spec.activation_group, lead),
                            "spec": dataclasses.replace(spec, tiled=True)}
                return node
            if spec.group_size is None and spec.weight_bits == 8 and (axes := tiled_shape(name, q)) is not None:
                return {**node, "qkernel": tile(q, *axes), "spec": dataclasses.replace(spec, tiled=True)}
            if spec.group_size is not None:  # packed int4 [*lead, G, S/2, *outputs]
                _, rhs, n_in = _contracted(own[name] if w4a8 else tiling[name])
                lead = q.ndim - 2 - (len(rhs) - n_in)
                n = math.prod(q.shape[lead + 2 :])
                tiled = dataclasses.replace(spec, tiled=True)
                if spec.activation_bits is not None:  # w4a8: its own layout, where its kernel runs
                    if lead in (0, 1) and w4a8_tileable(spec.group_size, n):
                        return {**node, "qkernel": w4a8_tile(q, lead), "spec": tiled}
                elif lead in (0, 1) and tileable_columns(n):  # int4: a tile is a group's byte rows
                    return {**node, "qkernel": tile(q, 2, lead, rows=q.shape[lead + 1]), "spec": tiled}
        return {key: walk(value, key) for key, value in node.items()}

    return walk(params)


def single_device(params: Any) -> Any:
    """`params` with every quantized projection kept on the plain path (`native=False`): for a
    tree placed on a mesh of more than one device, where the native kernels' custom calls
    would gather whole weights onto every device."""
    def off(leaf):
        return dataclasses.replace(leaf, native=False) if isinstance(leaf, MatmulSpec) else leaf

    return jax.tree.map(off, params, is_leaf=lambda leaf: isinstance(leaf, MatmulSpec))


def spec_of(scheme: Scheme) -> MatmulSpec:
    """The spec of a scheme's stored projections (group-wise ones add their input shape)."""
    return MatmulSpec(scheme.weight_bits, scheme.group_size, scheme.zero_point, scheme.activation_bits,
                      activation_group=scheme.activation_group)
