"""How the layer scan hands each layer its parameters: sliced by the scan, or whole with an index.

`jax.lax.scan` over stacked layer parameters gives each step its slice. For a plain matmul XLA
reads the slice in place, but an operand of a custom call (a native kernel) must be its own
buffer, so XLA copies every layer's weights out of the stack on every step: for a batch-1
decode step, which is all weight reading, that copy is a second pass over the weights.

A projection whose static spec names `whole_keys` (compress/quant/matmul.py, for its native
kernels) keeps those arrays out of the scan: each layer gets them whole, [L, ...], with the
layer's number under "layer", and the spec's matmul reads layer `layer` itself. Everything
else (norms, biases, adapters, float kernels without a spec) is sliced by the scan as before. Given the order
the layer calls its projections in, each also learns which weights come next, for its kernel
to prefetch (a decode step's memory would otherwise idle between two calls).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def _whole_keys(value: Any) -> tuple[str, ...]:
    if isinstance(value, dict) and "spec" in value:
        return tuple(k for k in getattr(value["spec"], "whole_keys", ()) if k in value)
    return ()


def split(layers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what the scan slices, what each layer reads whole): the stacked layer tree in two."""
    sliced, whole = {}, {}
    for name, value in layers.items():
        keys = _whole_keys(value)
        if keys:
            sliced[name] = {k: v for k, v in value.items() if k not in keys}
            whole[name] = {k: value[k] for k in keys}
        else:
            sliced[name] = value
    return sliced, whole


def layer(sliced: dict[str, Any], whole: dict[str, Any], index: jnp.ndarray,
          order: tuple[str, ...] = ()) -> dict[str, Any]:
    """One layer's parameters: the scan's slice, with the whole arrays and `index` put back.

    order: the projections in the order the layer calls them. Each whole one whose successor in
    it is whole too gets `after` = (the successor's code stack, its layer; the last one's is the
    first of the next layer), the weights its kernel prefetches while it finishes.
    """
    if not whole:
        return sliced
    params = {name: {**value, **whole[name], "layer": index} if name in whole else value
              for name, value in sliced.items()}
    chain = [name for name in order if _weights(whole.get(name, {})) is not None]
    for i, name in enumerate(chain):
        if i + 1 < len(chain):
            params[name]["after"] = (_weights(whole[chain[i + 1]]), index)
        else:
            params[name]["after"] = (_weights(whole[chain[0]]), index + 1)  # kernels clamp past the last
    return params


def _weights(arrays: dict[str, Any]) -> Any:
    """The stack a projection's kernel streams: its integer codes, or a float kernel."""
    return arrays.get("qkernel", arrays.get("kernel"))
