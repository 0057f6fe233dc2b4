"""Build a parameter pytree from named source tensors, each placed straight onto its sharding.

A *recipe* says, for every parameter leaf, which source tensor(s) it comes from and
how to reshape them into the leaf's layout. Stacked layer parameters name one
source tensor per layer. Each leaf is created with `jax.make_array_from_callback`:
every device shard reads only the layers it holds, converts them and hands them to
the device, so host memory holds at most one layer's float copy at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from compress import sharding as shd
from compress.formats.tensor_source import FormatError, TensorSource


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Where a parameter leaf comes from.

    sources: one tensor name, or one per layer for a stacked leaf (stacked on axis 0).
    transform: maps a source tensor to the leaf's per-layer layout (e.g. transpose). Use array
      methods only (.T, .reshape, .swapaxes), so it can be traced abstractly to check shapes.
    """

    sources: str | tuple[str, ...]
    transform: Callable[[np.ndarray], np.ndarray] = lambda x: x

    @property
    def stacked(self) -> bool:
        return isinstance(self.sources, tuple)


def _is_recipe(x) -> bool:
    return isinstance(x, Recipe)


def check_sources(recipes: Any, source: TensorSource, shapes: Any) -> None:
    """Fail before loading anything if a tensor is missing or would have the wrong shape."""
    available = set(source.names())
    flat_recipes = jax.tree_util.tree_flatten_with_path(recipes, is_leaf=_is_recipe)[0]
    flat_shapes = jax.tree.leaves(shapes)
    for (path, recipe), target in zip(flat_recipes, flat_shapes):
        names = recipe.sources if recipe.stacked else (recipe.sources,)
        want = target.shape[1:] if recipe.stacked else target.shape
        for name in names:
            if name not in available:
                raise FormatError(f"{source.path}: tensor {name!r} is missing (needed for parameter {jax.tree_util.keystr(path)})")
            # Trace the transform abstractly to learn the resulting shape without reading data.
            got = jax.eval_shape(recipe.transform, jax.ShapeDtypeStruct(source.shape(name), np.float32)).shape
            if tuple(got) != tuple(want):
                raise FormatError(
                    f"{source.path}: tensor {name!r} has shape {source.shape(name)}, which gives {tuple(got)} "
                    f"for parameter {jax.tree_util.keystr(path)}; the config expects {tuple(want)}"
                )


def materialize(
    recipes: Any,
    source: TensorSource,
    shapes: Any,
    axes: Any,
    mesh: Mesh | None = None,
) -> Any:
    """The parameter pytree, each leaf read from `source` onto its sharding on `mesh`.

    Args:
      recipes: a pytree of Recipe in the parameters' structure.
      source: the tensors to read.
      shapes: matching pytree of jax.ShapeDtypeStruct (the target dtype included).
      axes: matching pytree of logical axis names.
      mesh: the device mesh; defaults to a single device.
    """
    mesh = mesh or shd.single_device_mesh()
    check_sources(recipes, source, shapes)
    shardings = shd.tree_shardings(mesh, axes, shapes)

    @functools.lru_cache(maxsize=2)
    def read(name: str) -> np.ndarray:
        return source.read(name)

    def build(recipe: Recipe, target: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        dtype = np.dtype(target.dtype)

        def shard(index):
            index = index or tuple(slice(None) for _ in target.shape)
            if not recipe.stacked:
                return np.asarray(recipe.transform(read(recipe.sources))[index], dtype=dtype)
            layers = range(*index[0].indices(target.shape[0]))
            return np.stack([np.asarray(recipe.transform(read(recipe.sources[i]))[index[1:]], dtype=dtype) for i in layers])

        return jax.make_array_from_callback(target.shape, sharding, shard)

    return jax.tree.map(build, recipes, shapes, shardings, is_leaf=_is_recipe)


def per_layer(template: str, num_layers: int) -> tuple[str, ...]:
    """Source names for a stacked leaf: template with `{i}` for the layer index."""
    return tuple(template.format(i=i) for i in range(num_layers))


def flatten_for_export(params: Any, recipes: Any, inverse: Any) -> dict[str, np.ndarray]:
    """Inverse of `materialize`: named host tensors from a parameter pytree.

    inverse: pytree (like recipes) of functions mapping one layer's leaf back to the source layout.
    """
    out: dict[str, np.ndarray] = {}

    def emit(recipe: Recipe, inv: Callable, value) -> None:
        value = np.asarray(jax.device_get(value))
        if recipe.stacked:
            for name, layer in zip(recipe.sources, value):
                out[name] = inv(layer)
        else:
            out[recipe.sources] = inv(value)

    jax.tree.map(emit, recipes, inverse, params, is_leaf=_is_recipe)
    return out


def names_of(recipes: Any) -> Sequence[str]:
    names: list[str] = []
    for r in jax.tree.leaves(recipes, is_leaf=_is_recipe):
        names.extend(r.sources if r.stacked else (r.sources,))
    return names
