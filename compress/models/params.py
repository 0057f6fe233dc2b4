"""Parameter trees described before they exist: each leaf's shape, logical axes and initialiser.

A model module writes one `param_specs(config)` tree of ParamSpec; from it come the logical
axes (for the sharding table), abstract shapes (for loading and checkpoints, no memory) and
random initial values, so the three can never disagree.
"""

from __future__ import annotations

import typing
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

# The dtypes a model stores its weights in and computes in: the one list (configs type their
# dtype fields with Dtype; code looks the jnp type up in DTYPES).
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = {name: getattr(jnp, name) for name in typing.get_args(Dtype)}


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dimension (compress/sharding.py)
    init: str  # 'normal', 'ones' or 'zeros'


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def axes(specs: Any) -> Any:
    """The logical axis names of every leaf, in the tree's structure."""
    return jax.tree.map(lambda s: s.axes, specs, is_leaf=_is_spec)


def shapes(specs: Any, dtype) -> Any:
    """jax.ShapeDtypeStruct of every leaf (no memory allocated)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), specs, is_leaf=_is_spec)


def initialise(specs: Any, rng: jax.Array, dtype, scale: float = 0.02) -> Any:
    """Random values: normal(0, scale) for 'normal' leaves, ones and zeros for the others.

    To create them already sharded, jit the caller with `out_shardings`.
    """
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(rng, len(leaves))

    def make(spec, key):
        if spec.init == "ones":
            return jnp.ones(spec.shape, dtype)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, dtype)
        return (scale * jax.random.normal(key, spec.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])
