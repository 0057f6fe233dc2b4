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
  lora_rank    an adapter's rank (LoRA)       -> replicated (small; its other axis shards)
  kv_blocks    blocks of a prefix-cache pool  -> replicated (any row of a prefill may read any block)

A run may pass its own table (`rules=`) to every function here; RULES is the default.
A dimension whose size the chosen mesh axes do not divide is replicated
instead (SmolLM2 has 3 KV heads; a tensor axis of 2 cannot split them), except
with `strict=True`, which a training run uses: there it is an InputError naming
the parameter, since silently replicating a dimension multiplies its memory
(and its optimizer state's) by the mesh axis size.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from compress.errors import InputError

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
    ("lora_rank", None),
    ("kv_blocks", None),
)

Axes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


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
    axes: Axes,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    rules: Rules = RULES,
    *,
    strict: bool = False,
    name: str | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec through `rules`.

    With `shape` and `mesh`, a mesh axis of size 1, or one already used by an earlier
    dimension, is dropped. A dimension that the remaining mesh axes do not divide is
    replicated, or with `strict` raises InputError naming the tensor `name`.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, axis in enumerate(axes):
        if axis is not None and axis not in table:
            raise KeyError(f"logical axis {axis!r} has no sharding rule; known: {sorted(table)}")
        target = table.get(axis) if axis is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1 and a not in used)
            split = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape is not None and mesh_axes and shape[i] % split:
                if strict:
                    raise _indivisible(name, axes, shape, i, mesh_axes, mesh)
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _indivisible(name, axes, shape, i, mesh_axes, mesh) -> InputError:
    over = " x ".join(f"{a}={mesh.shape[a]}" for a in mesh_axes)
    split = math.prod(mesh.shape[a] for a in mesh_axes)
    return InputError(
        f"{name or 'a tensor'} {tuple(shape)}: dimension {i} ({axes[i]!r}, size {shape[i]}) cannot be split "
        f"over mesh axis {over} ({shape[i]} is not a multiple of {split}); choose mesh sizes that divide it, "
        f"or a sharding rule that maps {axes[i]!r} to another mesh axis (or to None, replicated)"
    )


def named_sharding(
    mesh: Mesh, axes: Axes, shape: Sequence[int], *, rules: Rules = RULES, strict: bool = False, name: str | None = None
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules, strict=strict, name=name))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def path_name(path: Sequence[Any]) -> str:
    """A pytree key path as the '/'-joined names freeze patterns and errors use: 'layers/q/kernel'."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_shardings(
    mesh: Mesh, axes_tree: Any, shapes_tree: Any, *, rules: Rules = RULES, strict: bool = False
) -> Any:
    """NamedShardings for a pytree, given the matching logical-axes and shape pytrees.

    rules: the logical-to-mesh table (default RULES). strict: a dimension the mesh cannot
    divide is an InputError naming the leaf's path ('layers/q/kernel') instead of replicated.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, axes, s: named_sharding(mesh, axes, s.shape, rules=rules, strict=strict, name=path_name(path)),
        axes_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def shard_params(params: Any, axes_tree: Any, mesh: Mesh, *, rules: Rules = RULES, strict: bool = False) -> Any:
    """Place an existing parameter pytree onto `mesh` according to its logical axes."""
    return jax.device_put(params, tree_shardings(mesh, axes_tree, params, rules=rules, strict=strict))


def batch_sharding(
    mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None, *, rules: Rules = RULES
) -> NamedSharding:
    """Sharding of a [batch, ...] input: the batch axis over data and fsdp."""
    axes: Mapping | tuple = ("batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
