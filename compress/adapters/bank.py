"""Several LoRA adapters served in one batch: each row of the batch picks its own (multi-LoRA).

    bank = make_bank([adapter_a, adapter_b], model_config)     # lora.adapters(...) / peft.read(...) dicts
    tree = with_bank(params, bank, rows)                       # rows [B] int32: 0 none, i adapter i
    decoder.forward(tree, tokens, model_config)                # row b runs base + its adapter

The bank stacks the adapters' factors per projection, behind an all-zero entry 0 (no adapter):

    lora_a  [layers?, n + 1, *in, r]     r the largest rank (smaller ones padded with zeros)
    lora_b  [layers?, n + 1, r, *out]    each adapter's scale folded in

A projection that some adapter does not touch holds zeros for it. `with_bank` puts the bank and
the rows' choices beside each projection's base arrays with a static `BankSpec`, which
`compress.models.linear.dense` calls like any adapter: it gathers each row's factors (a few
kilobytes per projection at rank 8) and adds x A B row by row, so the base weights, float or
integer, are read once per step for the whole batch, whichever adapters its rows use.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from compress.adapters import lora
from compress.errors import InputError
from compress.models import decoder
from compress.quant.weights import map_projections

ROWS = "lora_rows"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class BankSpec:
    """The static part of a banked projection: its factors are chosen per row by p['lora_rows']."""

    def apply(self, p: dict[str, Any], x: jnp.ndarray, equation: str) -> jnp.ndarray:
        eq_a, eq_b = lora.factor_equations(equation)
        batch = equation[0]  # a projection's activations lead with the batch axis ('BTD', 'BTNH')
        (x_sub, a_sub), h_sub = eq_a.split("->")[0].split(","), eq_a.split("->")[1]
        (_, b_sub), out_sub = eq_b.split("->")[0].split(","), eq_b.split("->")[1]
        a = p[lora.A][p[ROWS]].astype(x.dtype)  # [B, *in, r]
        b = p[lora.B][p[ROWS]].astype(x.dtype)  # [B, r, *out]
        h = jnp.einsum(f"{x_sub},{batch}{a_sub}->{h_sub}", x, a)
        return jnp.einsum(f"{h_sub},{batch}{b_sub}->{out_sub}", h, b).astype(x.dtype)


def make_bank(adapters: Sequence[dict[str, dict[str, Any]]], model_config: decoder.DecoderConfig,
              dtype=jnp.float32) -> dict[str, dict[str, jax.Array]]:
    """path -> {lora_a, lora_b}: the adapters stacked behind a zero entry (module docstring)."""
    if not adapters:
        raise InputError("a bank needs at least one adapter")
    specs = dict(lora.projection_kernels(decoder.param_specs(model_config)))
    paths = sorted({path for adapter in adapters for path in adapter})
    unknown = [path for path in paths if path not in specs]
    if unknown:
        raise InputError(f"adapters for projections this model does not have: {', '.join(unknown)}")
    rank = max(p[lora.A].shape[-1] for adapter in adapters for p in adapter.values())
    bank = {}
    for path in paths:
        a_spec, b_spec = lora.factor_specs(specs[path], decoder.PROJECTIONS[path.rsplit("/", 1)[-1]], rank)
        stacked = path.startswith("layers/")
        a = np.zeros((len(adapters) + 1, *a_spec.shape), np.float32)  # [n + 1, layers?, *in, r]
        b = np.zeros((len(adapters) + 1, *b_spec.shape), np.float32)
        for i, adapter in enumerate(adapters, 1):
            if path not in adapter:
                continue
            p = adapter[path]
            r, at = p[lora.A].shape[-1], int(stacked)  # the rank's axis in B
            without_rank = lambda shape: shape[:at] + shape[at + 1:]  # noqa: E731
            if p[lora.A].shape[:-1] != a_spec.shape[:-1] or without_rank(p[lora.B].shape) != without_rank(b_spec.shape):
                raise InputError(f"adapter {i} for {path}: factors {p[lora.A].shape} and {p[lora.B].shape} do not fit "
                                 "this model")
            a[i, ..., :r] = np.asarray(p[lora.A], np.float32)
            b[(i, *[slice(None)] * at, slice(0, r))] = p[lora.SPEC].scale * np.asarray(p[lora.B], np.float32)
        if stacked:  # the layer axis first, for the layer scan
            a, b = np.moveaxis(a, 0, 1), np.moveaxis(b, 0, 1)
        bank[path] = {lora.A: jnp.asarray(a, dtype), lora.B: jnp.asarray(b, dtype)}
    return bank


def with_bank(params: dict[str, Any], bank: dict[str, dict[str, jax.Array]], rows: jax.Array) -> dict[str, Any]:
    """`params` with the bank beside its projections and `rows` [B] (int32, 0: no adapter) choosing
    each batch row's adapter. Traceable (call it inside the jitted step)."""
    num_layers = next(iter(jax.tree.leaves(params["layers"]))).shape[0]

    def put(path, p):
        if lora.A in p:
            raise InputError(f"{path} already carries an adapter; serve a bank on the base model")
        chosen = jnp.broadcast_to(rows, (num_layers, *rows.shape)) if path.startswith("layers/") else rows
        return {**p, **bank[path], lora.SPEC: BankSpec(), ROWS: chosen}

    return map_projections(params, set(bank), put)
