"""Logical axis names, the one table that maps them to mesh axes, and meshes.

Every parameter (and the few activations we constrain) names its axes with
logical names. `RULES` is the single place that decides which mesh axis each
logical axis is split over. Mesh axes:

  data    pure data parallelism (parameters replicated)
  fsdp    data parallelism with parameters and optimizer state sharded
  tensor  tensor (model) parallelism inside a layer

Logical axes:

  batch        examples in a batch            -> (data, fsdp)
  seq          token positions                -> replicated
  layers       stacked transformer blocks     -> replicated (scanned over)
  vocab        vocabulary rows/columns        -> tensor
  embed        the residual stream width      -> fsdp
  mlp          feed-forward hidden width      -> tensor
  heads        query heads                    -> tensor
  kv_heads     key/value heads                -> tensor
  head_dim     width of one head              -> replicated
  norm         norm scales and biases         -> replicated
  positions    position-embedding rows        -> replicated (BERT; small, looked up)
  token_types  token-type-embedding rows      -> replicated (BERT's segments)

A dimension whose size the chosen mesh axes do not divide is replicated
instead (SmolLM2 has 3 KV heads; a tensor axis of 2 cannot split them).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# The one sharding table: logical axis -> mesh axis, tuple of mesh axes, or None.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("positions", None),
    ("token_types", None),
)

Axes = tuple[str | None, ...]


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[Any] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} devices, "
            f"{len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def single_device_mesh() -> Mesh:
    """A mesh of this process's first device (on a multi-host run, jax.devices()[0] is process 0's)."""
    return make_mesh(1, 1, 1, devices=jax.local_devices()[:1])


def logical_to_spec(
    axes: Axes, shape: Sequence[int] | None = None, mesh: Mesh | None = None, rules=RULES
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `rules`.

    With `shape` and `mesh`, a dimension that the mesh axes do not divide, or a mesh
    axis already used by an earlier dimension, is replicated rather than failing.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
            if shape is not None and mesh_axes and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Axes, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree: Any, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given the matching logical-axes and shape pytrees."""
    return jax.tree.map(
        lambda axes, s: named_sharding(mesh, axes, s.shape),
        axes_tree,
        shapes_tree,
        is_leaf=lambda x: isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x),
    )


def shard_params(params: Any, axes_tree: Any, mesh: Mesh) -> Any:
    """Place an existing parameter pytree onto `mesh` according to its logical axes."""
    return jax.device_put(params, tree_shardings(mesh, axes_tree, params))


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Sharding of a [batch, ...] input: the batch axis over data and fsdp."""
    axes: Mapping | tuple = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
