"""The train state: step, parameters, optimizer state and rng, with a static trainable mask.

Parameters are named by their '/'-joined path in the parameter tree, as the model's
docstring lists them: 'embed', 'layers/q/kernel', 'layers/attn_norm', 'lm_head/kernel'.
Freeze patterns are regular expressions that must match a whole name:

  freeze=("embed", "layers/(q|k|v|o)/.*")   # train the MLPs, norms and LM head only

Stacked layers: every leaf under `layers` holds all L layers along its first axis, so a
pattern freezes a projection in every layer at once; freezing some layers only is not
supported (it would need a gradient mask inside a leaf, and optimizer state for all of it).

The rng is held as raw key data (uint32), not a typed key: plain arrays checkpoint as they
are, and a jitted step's dispatch cache treats typed-key arguments less well (a second
cache entry appears on the third call, without a recompile).

The mask is static (a field of the pytree's structure, not a leaf): the step partitions the
parameters into the trainable part, which it differentiates and the optimizer updates, and
the frozen part, which it passes through untouched. The optimizer is initialised on the
trainable part only, so frozen leaves have no moments (they are None in its trees).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from compress.config import full_matches
from compress.errors import InputError
from compress.sharding import path_name

_LISTED = 12  # parameter names quoted in an error message


@struct.dataclass
class TrainState:
    """Everything a training run updates, as one pytree (donated to, and returned by, the step).

    `frozen` lives in the pytree's structure, so a jitted step specialises on it and two
    states with different masks never share a compiled step.
    """

    step: jax.Array  # [] int32: optimizer updates applied so far
    params: Any  # the whole parameter tree, trainable and frozen leaves
    opt_state: Any  # the optimizer's state over the trainable leaves (frozen leaves are None in it)
    rng: jax.Array  # raw PRNG key data (jax.random.key_data), split once per step for the loss
    frozen: tuple[str, ...] = struct.field(pytree_node=False, default=())  # sorted names of frozen leaves

    @property
    def trainable_params(self) -> Any:
        """The parameter tree with frozen leaves replaced by None (what the optimizer sees)."""
        return partition(self.params, self.frozen)[0]


def parameter_names(params: Any) -> list[str]:
    """'/'-joined names of every leaf, in flattening order."""
    return [path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def frozen_names(params: Any, freeze: Sequence[str]) -> tuple[str, ...]:
    """Sorted names of the leaves matched by any freeze pattern (a regex over the whole name).

    A pattern that matches no leaf is an InputError (a typo would otherwise train everything).
    """
    names = parameter_names(params)
    frozen: set[str] = set()
    for pattern in freeze:
        matched = full_matches(pattern, names, "freeze")
        if not matched:
            shown = ", ".join(names[:_LISTED]) + (", ..." if len(names) > _LISTED else "")
            raise InputError(
                f"freeze pattern {pattern!r} matches no parameter; patterns are regular expressions over a "
                f"whole '/'-joined name, e.g. 'layers/q/.*'. Parameters: {shown}"
            )
        frozen.update(matched)
    return tuple(sorted(frozen))


def trainable_mask(params: Any, frozen: Sequence[str]) -> Any:
    """A tree of bools in `params`' structure: True for leaves that train."""
    frozen = set(frozen)
    return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path) not in frozen, params)


def partition(params: Any, frozen: Sequence[str]) -> tuple[Any, Any]:
    """(trainable, frozen) trees in `params`' structure, each with None where the other has a leaf."""
    mask = trainable_mask(params, frozen)
    trainable = jax.tree.map(lambda keep, x: x if keep else None, mask, params)
    fixed = jax.tree.map(lambda keep, x: None if keep else x, mask, params)
    return trainable, fixed


def combine(trainable: Any, fixed: Any) -> Any:
    """The inverse of `partition`: each leaf from whichever tree has it."""
    return jax.tree.map(lambda a, b: b if a is None else a, trainable, fixed, is_leaf=lambda x: x is None)


def new_train_state(params: Any, opt_state: Any, rng: jax.Array, frozen: Sequence[str] = ()) -> TrainState:
    """A state at step 0 (rng: a typed key or its raw data). Prefer `init_train_state`, which also shards it."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=key_data(rng),
                      frozen=tuple(sorted(frozen)))


def key_data(rng: jax.Array) -> jax.Array:
    """The raw data of a PRNG key (unchanged if it is raw data already)."""
    return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
