"""The train step: a pure `(state, batch) -> (state, metrics)`, jitted once, state donated.

    state, shardings = init_train_state(lambda k: decoder.init_params(config, k), optimizer, rng,
                                        mesh=mesh, param_axes=decoder.param_axes(config))
    step = make_train_step(causal_lm_loss(config), optimizer, mesh, shardings,
                           learning_rate=learning_rate_schedule(optimizer_config))
    for batch in batches:
        state, metrics = step(state, batch)   # the old state's buffers are reused (donated)

Layout (FSDP): parameters follow the sharding rules (compress/sharding.py), strictly by
default, so a dimension the mesh cannot split is an error naming the parameter; every
optimizer-state leaf that mirrors a parameter (Adam's moments) takes that parameter's
sharding; step, rng and the optimizer's counters are replicated. The state is created in
this layout (`jax.jit(..., out_shardings=...)`), never gathered on one device first.

Gradient accumulation runs inside the step: the batch's rows are split into k microbatches
(rows i, i+k, i+2k, ... form microbatch i, so each device keeps its own rows) and a
`lax.scan` sums their float32 gradients, weighted by each microbatch's "tokens" (from the
loss's aux), before one optimizer update. So k microbatches give the update of one step on
the whole batch, and one call is one update: the step counter and schedule count updates.
optax.MultiSteps was the alternative; it was not chosen because it keeps a parameter-sized
accumulator in the optimizer state (and checkpoints), weights microbatches equally whatever
their token counts, and makes every call a microstep of the schedule's count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from compress import sharding as shd
from compress.errors import InputError
from compress.train.loss import LossFn
from compress.train.state import TrainState, combine, frozen_names, key_data, new_train_state, partition

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, Metrics]]

# The aux entry that weights microbatches in accumulation (the number of terms a loss averages).
WEIGHT_KEY = "tokens"


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings of every leaf of a train state (from `jax.eval_shape`).

    Parameters take `param_shardings`. An optimizer-state leaf whose key path ends with a
    parameter's path and has that parameter's shape (Adam's mu['layers']['q']['kernel'])
    takes that parameter's sharding; anything else (counters, the step, the rng) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    params_flat = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    shardings_flat = jax.tree.leaves(param_shardings)
    by_path = {tuple(path): (leaf.shape, s) for (path, leaf), s in zip(params_flat, shardings_flat, strict=True)}

    def like_its_param(path, leaf):
        for start in range(len(path)):
            match = by_path.get(tuple(path[start:]))
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return replicated

    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=jax.tree_util.tree_map_with_path(like_its_param, abstract_state.opt_state),
        rng=replicated,
        frozen=abstract_state.frozen,
    )


def init_train_state(
    params: Any | Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    *,
    mesh: Mesh,
    param_axes: Any,
    freeze: Sequence[str] = (),
    rules: shd.Rules = shd.RULES,
    strict: bool = True,
) -> tuple[TrainState, TrainState]:
    """A step-0 train state laid out on `mesh`, and its shardings (for `make_train_step`).

    Args:
      params: a parameter tree (e.g. loaded pretrained weights; moved to its sharding if it
        is not there yet) or a function rng -> parameters, which then runs under jit with
        out_shardings so the parameters are created directly on their shards.
      optimizer: the optax transformation; its state is created over the trainable leaves only.
      rng: a PRNG key (jax.random.key); split for the parameters' init if needed. The state
        holds its raw data; the loss receives typed keys.
      mesh: the (data, fsdp, tensor) mesh.
      param_axes: the logical axes of every parameter (e.g. decoder.param_axes(config)).
      freeze: regexes over '/'-joined parameter names; matched leaves are frozen
        (compress/train/state.py).
      rules, strict: the sharding table and whether an indivisible dimension is an error.
    Returns:
      (state, shardings): the state and a TrainState of the NamedShardings of its leaves.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    make_params = params if callable(params) else None
    if make_params is not None:
        params_rng, rng = jax.random.split(rng)
        abstract_params = jax.eval_shape(make_params, params_rng)
    else:
        abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    frozen = frozen_names(abstract_params, freeze)
    param_shardings = shd.tree_shardings(mesh, param_axes, abstract_params, rules=rules, strict=strict)

    def build(params, rng):
        return new_train_state(params, optimizer.init(partition(params, frozen)[0]), rng, frozen)

    shardings = state_shardings(jax.eval_shape(build, abstract_params, rng), param_shardings, mesh)
    if make_params is not None:
        create = jax.jit(lambda k, r: build(make_params(k), r), out_shardings=shardings)
        return create(params_rng, rng), shardings
    # Existing parameters are not passed through jit (that would copy them): only the optimizer
    # state is created there, on the parameters' shards.
    params = jax.device_put(params, param_shardings)
    init_opt = jax.jit(lambda p: optimizer.init(partition(p, frozen)[0]), out_shardings=shardings.opt_state)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
        params=params,
        opt_state=init_opt(params),
        rng=jax.device_put(key_data(rng), replicated),
        frozen=frozen,
    )
    return state, shardings


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    state_shardings: TrainState,
    batch_sharding: Any = None,
    *,
    grad_accum_steps: int = 1,
    learning_rate: optax.Schedule | None = None,
    donate: bool = True,
    constants_sharding: Any = None,
) -> TrainStep:
    """The jitted step `(state, batch) -> (new_state, metrics)`; compiles once per batch shape.

    Args:
      loss_fn: `(params, batch, rng) -> (loss, aux)` (compress/train/loss.py); aux's scalars
        are reported as metrics, and its "tokens" weights microbatches.
      optimizer: the optax transformation the state was initialised with.
      mesh: the mesh the state lives on.
      state_shardings: the shardings `init_train_state` returned.
      batch_sharding: a NamedSharding for every batch entry, or a tree of them; by default
        the batch axis over (data, fsdp).
      grad_accum_steps: split each batch into this many microbatches (the batch size must be
        a multiple of it) and accumulate their gradients before one update.
      learning_rate: the optimizer's schedule, to report "learning_rate" (the rate this step used).
      donate: donate the state's buffers to the step (the caller must not use the old state).
      constants_sharding: a tree of shardings, when the loss reads arrays it never trains (a
        distillation teacher's parameters). The step is then `(state, batch, constants)`, the
        loss `loss_fn(params, batch, rng, constants)`: the constants are an argument of the
        compiled step, laid out on the mesh like the state, not values baked into the program.
    Returns:
      The step. Metrics are replicated float32 scalars: "loss", "grad_norm" (before clipping),
      "learning_rate" if a schedule was given, and the loss's aux (its "tokens" summed over
      microbatches, the rest averaged with the microbatch weights).
    """
    if grad_accum_steps < 1:
        raise ValueError(f"grad_accum_steps must be at least 1, got {grad_accum_steps}")
    if batch_sharding is None:
        batch_sharding = shd.batch_sharding(mesh, 2)
    replicated = NamedSharding(mesh, PartitionSpec())
    k = grad_accum_steps

    with_constants = constants_sharding is not None

    def train_step(state: TrainState, batch: Batch, *constants) -> tuple[TrainState, Metrics]:
        trainable, fixed = partition(state.params, state.frozen)
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def loss_of_trainable(trainable, batch, rng):
            return loss_fn(combine(trainable, fixed), batch, rng, *constants)

        grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)
        if k == 1:
            (loss, aux), grads = grad_fn(trainable, batch, step_rng)
        else:
            loss, aux, grads = _accumulate(grad_fn, trainable, batch, step_rng, k, batch_sharding)

        updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": _global_norm(grads), **aux}
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate(state.step)
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        new_state = state.replace(
            step=state.step + 1, params=combine(trainable, fixed), opt_state=opt_state, rng=jax.random.key_data(rng)
        )
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding, *((constants_sharding,) if with_constants else ())),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
    )


def _global_norm(tree) -> jax.Array:
    """The L2 norm of all leaves together, in float32 (what clip_by_global_norm clips)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _accumulate(grad_fn, trainable, batch: Batch, rng: jax.Array, k: int, batch_sharding):
    """(loss, aux, grads) of the whole batch from k microbatches under lax.scan, weighted by tokens."""
    rows = {leaf.shape[0] for leaf in jax.tree.leaves(batch)}
    if len(rows) != 1 or next(iter(rows)) % k:
        raise InputError(
            f"batch entries have {sorted(rows)} rows; gradient accumulation over {k} microbatches needs one "
            f"row count that is a multiple of {k}"
        )

    def split(x):  # [k * b, ...] -> [k, b, ...]; microbatch i holds rows i, i + k, ...
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    microbatches = jax.tree.map(split, batch)
    first = jax.tree.map(lambda x: x[0], microbatches)
    (_, aux_shape), _ = jax.eval_shape(grad_fn, trainable, first, rng)
    f32_zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)  # noqa: E731

    def body(carry, xs):
        grad_sum, loss_sum, aux_sum, weight_sum = carry
        index, microbatch = xs
        microbatch = jax.lax.with_sharding_constraint(microbatch, batch_sharding)
        (loss, aux), grads = grad_fn(trainable, microbatch, jax.random.fold_in(rng, index))
        weight = aux[WEIGHT_KEY].astype(jnp.float32) if WEIGHT_KEY in aux else jnp.float32(1)
        grad_sum = jax.tree.map(lambda s, g: s + weight * g.astype(jnp.float32), grad_sum, grads)
        aux_sum = {
            name: s + (aux[name] if name == WEIGHT_KEY else weight * aux[name]).astype(jnp.float32)
            for name, s in aux_sum.items()
        }
        return (grad_sum, loss_sum + weight * loss, aux_sum, weight_sum + weight), None

    carry = (f32_zeros(trainable), jnp.float32(0), f32_zeros(aux_shape), jnp.float32(0))
    (grad_sum, loss_sum, aux_sum, weight_sum), _ = jax.lax.scan(
        body, carry, (jnp.arange(k), microbatches)
    )
    total = jnp.where(weight_sum > 0, weight_sum, 1.0)
    grads = jax.tree.map(lambda s, p: (s / total).astype(p.dtype), grad_sum, trainable)
    aux = {name: s if name == WEIGHT_KEY else s / total for name, s in aux_sum.items()}
    return loss_sum / total, aux, grads
