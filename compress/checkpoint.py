"""Checkpoints of sharded parameter pytrees, written and read with orbax-checkpoint.

A checkpoint directory holds one sub-directory per saved step. Each step holds the
parameter tree, or a whole train state (every array written shard by shard, so no host
ever gathers a full copy), optionally a small JSON dict saved beside it (e.g. the model
config), and any extra items registered when the Checkpointer is created (a training run
keeps its data iterator's position this way: `extra_items={"data": grain's handler}`).

Arrays are restored straight into the sharding you ask for, which need not be the
one they were saved from: save from a data x fsdp x tensor mesh, restore onto a
pure fsdp mesh or a single device. Each device reads only the slices it holds.

Saving is atomic: orbax writes a step into a temporary directory and renames it
when complete, and old steps beyond `max_to_keep` are deleted only after the new
one is committed, so a crash mid-save leaves the previous checkpoint intact.

  with Checkpointer(directory, max_to_keep=3) as ckpt:
      ckpt.save(step, params, metadata=dataclasses.asdict(config))
      ...
      params = ckpt.restore(shapes=decoder.param_shapes(config), mesh=mesh,
                            axes=decoder.param_axes(config))
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

from compress import sharding as shd

PARAMS_ITEM = "params"
METADATA_ITEM = "metadata"
_MAX_LISTED = 10  # keys or directory entries quoted in an error message


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint, or not the requested step, in a directory."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint exists but could not be read; the orbax error is its __cause__."""


class CheckpointMismatchError(ValueError):
    """The requested tree's structure or shapes differ from the checkpoint's."""


class Checkpointer:
    """Numbered checkpoints of a parameter pytree in one directory.

    Wraps `orbax.checkpoint.CheckpointManager`. Not thread-safe; in a multi-host job
    create and call it on every process. The list of steps is read when it is
    created and updated by its own saves.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: keep only this many most recent steps (None keeps all).
      async_save: write in a background thread; `save` returns once the arrays
        are copied to host memory, so the caller may donate or update them.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 extra_items: dict[str, Any] | None = None):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep={max_to_keep}; it must be at least 1 (or None to keep every step)")
        self.directory = _absolute(directory)
        self.extra_items = dict(extra_items or {})
        clash = {PARAMS_ITEM, METADATA_ITEM} & self.extra_items.keys()
        if clash:
            raise ValueError(f"extra checkpoint items may not be named {sorted(clash)}")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        # Registering every item up front lets a fresh Checkpointer read step metadata
        # (and so check shapes) before its first save or restore.
        registry = ocp.handlers.create_default_handler_registry(
            **{PARAMS_ITEM: ocp.handlers.StandardCheckpointHandler(), METADATA_ITEM: ocp.handlers.JsonCheckpointHandler()},
            **self.extra_items,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # --- saving

    def save(self, step: int, params: Any, *, metadata: dict[str, Any] | None = None, wait: bool = False,
             extra: dict[str, Any] | None = None) -> None:
        """Save `params` (a pytree of jax.Arrays, any sharding) as checkpoint `step`.

        Args:
          step: a step number larger than every step already saved here.
          params: the parameter pytree (or a whole train state).
          metadata: an optional JSON-serialisable dict stored beside the parameters,
            read back by `restore_metadata` (tuples come back as lists).
          wait: block until the checkpoint is committed to disk.
          extra: orbax save args for the extra items (e.g. {"data": grain.checkpoint.CheckpointSave(it)}).
        """
        unknown = (extra or {}).keys() - self.extra_items.keys()
        if unknown:
            raise ValueError(f"checkpoint items {sorted(unknown)} were not registered (extra_items={sorted(self.extra_items)})")
        steps = self.all_steps()
        if step in steps:
            raise ValueError(
                f"checkpoint step {step} already exists in {self.directory}; steps are never overwritten. "
                f"Save under a new step or delete the directory {self.directory / str(step)} first"
            )
        if steps and step < steps[-1]:
            raise ValueError(
                f"cannot save step {step} in {self.directory}: it is older than the latest step {steps[-1]} "
                "(orbax would silently skip it). Use a larger step number"
            )
        metadata = {} if metadata is None else metadata
        try:
            json.dumps(metadata)
        except TypeError as e:
            raise TypeError(f"checkpoint metadata for step {step} is not JSON-serialisable: {e}") from e
        args = ocp.args.Composite(
            **{PARAMS_ITEM: ocp.args.StandardSave(params), METADATA_ITEM: ocp.args.JsonSave(metadata)}, **(extra or {})
        )
        if not self._manager.save(step, args=args):
            raise RuntimeError(f"orbax declined to save step {step} in {self.directory}")
        if wait:
            self.wait()

    def wait(self) -> None:
        """Block until every pending asynchronous save is committed."""
        self._manager.wait_until_finished()

    # --- listing

    def all_steps(self) -> list[int]:
        """Saved steps in increasing order (a step being written asynchronously included)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # --- restoring

    def restore(
        self,
        step: int | None = None,
        *,
        shapes: Any,
        shardings: Any = None,
        mesh: Mesh | None = None,
        axes: Any = None,
    ) -> Any:
        """Read the parameters of `step` (default: the latest) onto the requested shardings.

        Args:
          step: which step; None for the latest.
          shapes: pytree of jax.ShapeDtypeStruct (e.g. `decoder.param_shapes(config)`) or
            arrays giving each leaf's shape and dtype. A dtype that differs from the
            saved one is converted to.
          shardings: pytree of jax.sharding.Sharding matching `shapes`. Or give
          mesh, axes: a mesh and the logical-axes tree (e.g. `decoder.param_axes(config)`),
            mapped through `sharding.RULES`. With neither, each leaf of `shapes` must
            carry its own `.sharding`.

        Returns:
          The parameter pytree; every leaf a jax.Array with the requested sharding.

        Raises:
          CheckpointNotFoundError: no checkpoint here, or not `step`.
          CheckpointMismatchError: `shapes` has keys or shapes the checkpoint lacks.
          CorruptCheckpointError: the step's files could not be read.
        """
        step = self._resolve_step(step)
        target = abstract_tree(shapes, shardings=shardings, mesh=mesh, axes=axes)
        where = f"checkpoint step {step} in {self.directory}"
        try:
            saved = self._manager.metadata(step).item_metadata[PARAMS_ITEM]
        except Exception as e:  # noqa: BLE001 - any failure to read is reported as corruption
            raise self._corrupt(step, e) from e
        if saved is None:
            raise self._corrupt(step, ValueError(f"no readable metadata for item {PARAMS_ITEM!r}"))
        _check_matches(saved, target, where)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(target)}))
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return restored[PARAMS_ITEM]

    def restore_item(self, name: str, args: Any, step: int | None = None) -> Any:
        """Restore the extra item `name` of `step` (default: the latest) with orbax restore `args`
        (e.g. grain.checkpoint.CheckpointRestore(iterator) sets the iterator's position)."""
        if name not in self.extra_items:
            raise ValueError(f"checkpoint item {name!r} was not registered (extra_items={sorted(self.extra_items)})")
        step = self._resolve_step(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata saved with `step` (default: the latest); {} if none was given."""
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001
            raise self._corrupt(step, e) from e
        return restored[METADATA_ITEM]

    # --- lifetime

    def close(self) -> None:
        """Wait for pending saves and release orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.directory)!r}, steps={self.all_steps()})"

    # --- errors

    def _resolve_step(self, step: int | None) -> int:
        self.wait()  # a step still being written asynchronously is read only once it is committed
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}: {_describe_directory(self.directory)}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(f"no checkpoint step {step} in {self.directory}; available steps: {steps}")
        return step

    def _corrupt(self, step: int, error: Exception) -> CorruptCheckpointError:
        others = [s for s in self.all_steps() if s != step]
        hint = f"other steps here: {others}; restore one with step=N" if others else "no other steps are saved here"
        return CorruptCheckpointError(
            f"checkpoint step {step} in {self.directory} could not be read; it may be corrupt or incomplete "
            f"({type(error).__name__}: {_first_line(error)}). {hint}"
        )


# --- one-off saves


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write `params` to a new checkpoint directory `path` and wait until it is complete."""
    path = _absolute(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; save_params never overwrites. Choose a new path or delete it")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
        checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, shapes: Any, shardings: Any = None) -> Any:
    """Read a `save_params` checkpoint onto `shardings` (see `Checkpointer.restore` for the arguments)."""
    path = _absolute(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {path}: the directory does not exist")
    target = abstract_tree(shapes, shardings=shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            saved = checkpointer.metadata(path).item_metadata
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {_first_line(e)})") from e
        if saved is None:
            raise CorruptCheckpointError(f"checkpoint {path} has no readable parameter metadata: {_describe_directory(path)}")
        _check_matches(saved, target, f"checkpoint {path}")
        try:
            return checkpointer.restore(path, target)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(
                f"checkpoint {path} could not be read; it may be corrupt or incomplete ({type(e).__name__}: {_first_line(e)})"
            ) from e


# --- targets and checks


def abstract_tree(shapes: Any, *, shardings: Any = None, mesh: Mesh | None = None, axes: Any = None) -> Any:
    """jax.ShapeDtypeStruct leaves carrying the shardings to restore into.

    Give `shardings` (a matching pytree), or `mesh` and logical `axes`, or neither
    when every leaf of `shapes` already has a `.sharding`.
    """
    if (mesh is None) != (axes is None):
        raise ValueError("give both mesh and axes (the logical-axes tree), or neither")
    if mesh is not None:
        if shardings is not None:
            raise ValueError("give either shardings or mesh and axes, not both")
        shardings = shd.tree_shardings(mesh, axes, shapes)
    if shardings is None:
        missing = [_path(p) for p, s in jax.tree.flatten_with_path(shapes)[0] if getattr(s, "sharding", None) is None]
        if missing:
            raise ValueError(f"no sharding for {_quote(missing)}; pass shardings=, or mesh= and axes=")
        shardings = jax.tree.map(lambda s: s.sharding, shapes)
    _check_same_structure(shapes, shardings, "shapes", "shardings")
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes, shardings)


def _check_same_structure(a: Any, b: Any, a_name: str, b_name: str) -> None:
    a_keys = {_path(p) for p, _ in jax.tree.flatten_with_path(a)[0]}
    b_keys = {_path(p) for p, _ in jax.tree.flatten_with_path(b, is_leaf=lambda x: x is None)[0]}
    if a_keys != b_keys:
        raise ValueError(
            f"{a_name} and {b_name} are different trees: only in {a_name}: {_quote(sorted(a_keys - b_keys))}; "
            f"only in {b_name}: {_quote(sorted(b_keys - a_keys))}"
        )


def _check_matches(saved_metadata: Any, target: Any, where: str) -> None:
    """Raise CheckpointMismatchError naming keys missing from either tree or of different shape."""
    saved_tree = getattr(saved_metadata, "tree", saved_metadata)  # orbax's TreeMetadata wraps the tree
    saved = {_path(p): tuple(m.shape) for p, m in jax.tree.flatten_with_path(saved_tree, is_leaf=_has_shape)[0]}
    wanted = {_path(p): tuple(s.shape) for p, s in jax.tree.flatten_with_path(target)[0]}
    problems = []
    if only_wanted := sorted(wanted.keys() - saved.keys()):
        problems.append(f"not in the checkpoint: {_quote(only_wanted)}")
    if only_saved := sorted(saved.keys() - wanted.keys()):
        problems.append(f"in the checkpoint but not requested: {_quote(only_saved)}")
    if reshaped := [f"{k} saved {saved[k]} requested {wanted[k]}" for k in sorted(saved.keys() & wanted.keys()) if saved[k] != wanted[k]]:
        problems.append(f"different shapes: {'; '.join(reshaped[:_MAX_LISTED])}")
    if problems:
        raise CheckpointMismatchError(
            f"{where} does not match the requested tree ({'. '.join(problems)}). "
            "Pass the shapes of the model config the checkpoint was saved with"
        )


def _has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


# --- formatting


def _absolute(path: str | os.PathLike) -> epath.Path:
    # orbax wants absolute paths; leave URLs (gs://...) alone.
    return epath.Path(path) if "://" in str(path) else epath.Path(os.path.abspath(path))


def _path(key_path) -> str:
    return jax.tree_util.keystr(key_path, simple=True, separator="/")


def _quote(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _first_line(error: Exception, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe_directory(directory: epath.Path) -> str:
    if not directory.exists():
        return "the directory does not exist"
    entries = sorted(p.name for p in directory.iterdir())
    if not entries:
        return "the directory is empty"
    return f"it holds no finished step directory, only: {_quote(entries)}"
