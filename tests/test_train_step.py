"""The train state and step: the loss falls, frozen leaves stay bit-identical with no optimizer
state, k microbatches equal one step on their concatenation, 8 sharded devices equal one, the
optimizer state is sharded like its parameters, and the step compiles once with donated state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compress import config as config_lib
from compress import sharding as shd
from compress.errors import InputError
from compress.models import decoder
from compress.train import (
    OptimizerConfig,
    causal_lm_loss,
    cross_entropy,
    init_train_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    parameter_names,
)

# The decoder's default shapes are already tiny (V=256, D=64, 2 layers); no tokenizer is needed.
CONFIG = decoder.DecoderConfig()
OPTIMIZER = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=40)


def init(mesh=None, optimizer_config=OPTIMIZER, config=CONFIG, **kwargs):
    optimizer = make_optimizer(optimizer_config)
    mesh = mesh or shd.single_device_mesh()
    state, shardings = init_train_state(
        lambda k: decoder.init_params(config, k, scale=0.1), optimizer, jax.random.key(0),
        mesh=mesh, param_axes=decoder.param_axes(config), **kwargs,
    )
    return state, shardings, optimizer, mesh


def make_batch(rows=8, length=16, seed=0, ragged=False):
    tokens = np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (rows, length + 1))
    mask = np.ones((rows, length), np.float32)
    if ragged:  # rows of different lengths, so microbatches count different numbers of tokens
        for r in range(rows):
            mask[r, length - 3 * r % length:] = 0
    return {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "loss_mask": jnp.asarray(mask),
    }


def run(state, shardings, optimizer, mesh, batches, **kwargs):
    step = make_train_step(causal_lm_loss(CONFIG), optimizer, mesh, shardings, **kwargs)
    metrics = []
    for batch in batches:
        state, m = step(state, batch)
        metrics.append(jax.tree.map(float, m))
    return state, metrics, step


def host(tree):
    return jax.tree.map(np.asarray, tree)


def adam_state(opt_state) -> optax.ScaleByAdamState:
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (found,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    return found


# ----------------------------------------------------------------------------- the step


def test_loss_falls_over_twenty_steps_on_a_fixed_batch():
    state, shardings, optimizer, mesh = init()
    batch = make_batch()
    _, metrics, _ = run(state, shardings, optimizer, mesh, [batch] * 20,
                        learning_rate=learning_rate_schedule(OPTIMIZER))
    losses = [m["loss"] for m in metrics]
    assert abs(losses[0] - np.log(CONFIG.vocab_size)) < 0.5  # a random model starts near uniform
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics[0]["learning_rate"] == 0.0 and metrics[2]["learning_rate"] == pytest.approx(1e-2)
    assert metrics[0]["tokens"] == 8 * 16 and all(m["grad_norm"] > 0 for m in metrics)
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]


def test_frozen_leaves_are_untouched_and_have_no_optimizer_state():
    freeze = ("embed", "layers/(q|k)/kernel")
    state, shardings, optimizer, mesh = init(freeze=freeze)
    assert state.frozen == ("embed", "layers/k/kernel", "layers/q/kernel")
    before = host(state.params)
    state, _, _ = run(state, shardings, optimizer, mesh, [make_batch(seed=s) for s in range(3)])
    after = host(state.params)

    names = parameter_names(before)
    for name, old, new in zip(names, jax.tree.leaves(before), jax.tree.leaves(after)):
        if name in state.frozen:
            np.testing.assert_array_equal(new, old, err_msg=name)  # bit-identical, despite weight decay
        elif name in ("layers/v/kernel", "lm_head/kernel", "layers/attn_norm"):
            assert not np.array_equal(new, old), name
    trainable = set(names) - set(state.frozen)
    adam = adam_state(state.opt_state)
    assert set(parameter_names(adam.mu)) == set(parameter_names(adam.nu)) == trainable
    assert set(parameter_names(state.trainable_params)) == trainable
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state)) - 2  # less Adam's and the schedule's counts
    trainable_size = sum(leaf.size for n, leaf in zip(names, jax.tree.leaves(before)) if n in trainable)
    assert moments == 2 * trainable_size


def test_a_freeze_pattern_that_matches_nothing_is_an_input_error():
    pattern = r"freeze pattern 'layers/attn/q_proj/kernel' matches no parameter.*layers/q/kernel"
    with pytest.raises(InputError, match=pattern):
        init(freeze=("layers/attn/q_proj/kernel",))


def test_accumulated_microbatches_equal_one_step_on_their_concatenation():
    # Plain SGD, so parameters move by exactly lr * gradient: AdamW's first update, lr * g / (|g| + eps), would
    # turn rounding differences in gradients near zero into visible ones.
    optimizer = optax.sgd(0.5)
    batch = make_batch(rows=8, ragged=True)  # microbatches hold 16 to 4 tokens: they must be weighted by tokens
    results = {}
    for k in (1, 4):
        mesh = shd.single_device_mesh()
        state, shardings = init_train_state(lambda key: decoder.init_params(CONFIG, key, scale=0.1), optimizer,
                                            jax.random.key(0), mesh=mesh, param_axes=decoder.param_axes(CONFIG))
        state, metrics, _ = run(state, shardings, optimizer, mesh, [batch, batch], grad_accum_steps=k)
        results[k] = (host(state.params), metrics)
    (params_1, metrics_1), (params_4, metrics_4) = results[1], results[4]
    assert metrics_1[0]["tokens"] == metrics_4[0]["tokens"] == batch["loss_mask"].sum()
    for m1, m4 in zip(metrics_1, metrics_4):
        for name in ("loss", "accuracy", "grad_norm"):
            assert m4[name] == pytest.approx(m1[name], rel=1e-5, abs=1e-6), name
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), params_4, params_1)


def test_eight_sharded_devices_equal_one_and_optimizer_state_is_sharded_like_its_parameters():
    batches = [make_batch(rows=16, seed=s, ragged=s == 1) for s in range(3)]
    runs = {}
    for name, mesh in (("one", shd.single_device_mesh()), ("data2-fsdp4", shd.make_mesh(2, 4, 1))):
        state, shardings, optimizer, mesh = init(mesh)
        state, metrics, _ = run(state, shardings, optimizer, mesh, batches, grad_accum_steps=2)
        runs[name] = state, metrics

    state, metrics = runs["data2-fsdp4"]
    q = state.params["layers"]["q"]["kernel"]  # [L, D, N, H]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    assert {s.data.shape for s in q.addressable_shards} == {(2, 16, 4, 16)}
    param_shardings = {n: x.sharding for n, x in zip(parameter_names(state.params), jax.tree.leaves(state.params))}
    adam = adam_state(state.opt_state)
    for moments in (adam.mu, adam.nu):
        for name, leaf in zip(parameter_names(moments), jax.tree.leaves(moments)):
            assert leaf.sharding == param_shardings[name], name
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()

    _, single = runs["one"]
    for got, want in zip(metrics, single):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    # AdamW's early updates are about lr * sign(g), so a gradient within rounding of zero can move a weight
    # by a fraction of lr (1e-2) differently; a wrong sharding would move many by far more.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=0),
                 host(state.params), host(runs["one"][0].params))


def test_existing_parameters_train_on_their_shards_in_a_step_compiled_once_with_donated_state():
    mesh = shd.make_mesh(1, 8, 1)
    params = decoder.init_params(CONFIG, jax.random.key(0), scale=0.1)  # e.g. loaded pretrained weights
    optimizer = make_optimizer(OPTIMIZER)
    state, shardings = init_train_state(params, optimizer, jax.random.key(1), mesh=mesh,
                                        param_axes=decoder.param_axes(CONFIG), freeze=("lm_head/.*",))
    assert state.params["embed"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    jax.tree.map(np.testing.assert_array_equal, host(state.params), host(params))

    step = make_train_step(causal_lm_loss(CONFIG), optimizer, mesh, shardings)
    # On their shards already, as a data pipeline delivers them (else each call's device_put compiles a slicer).
    batches = [jax.device_put(make_batch(seed=seed), shd.batch_sharding(mesh, 2)) for seed in (0, 0, 0, 1)]
    compiles, counting = [], [True]  # jax.monitoring listeners cannot be removed: stop counting after the test
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_, **__: compiles.append(event)
        if counting[0] and event == "/jax/core/compile/backend_compile_duration" else None
    )
    losses = []
    try:
        for batch in batches:
            old = state
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            assert all(x.is_deleted() for x in jax.tree.leaves(old))  # donated: its buffers now hold the new state
    finally:
        counting[0] = False
    assert len(compiles) == 1 and step._cache_size() == 1
    assert int(state.step) == 4
    assert losses[2] < losses[0]  # the first step's learning rate is 0 (warmup)
    jax.tree.map(np.testing.assert_array_equal, host(state.params["lm_head"]), host(params["lm_head"]))


def test_strict_sharding_names_the_parameter_the_mesh_cannot_split():
    odd = dataclasses.replace(CONFIG, embed_dim=36)
    with pytest.raises(InputError, match=r"^embed \(256, 36\): dimension 1 \('embed', size 36\).*fsdp=8"):
        init(shd.make_mesh(1, 8, 1), config=odd)
    state, *_ = init(shd.make_mesh(1, 8, 1), config=odd, strict=False)  # replicated, as for inference
    assert state.params["embed"].sharding.spec == jax.sharding.PartitionSpec(None, None)


# ----------------------------------------------------------------------------- the loss


def test_cross_entropy_is_the_masked_mean_in_float32():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 1, 1, 1]], jnp.float32)
    loss, aux = jax.jit(cross_entropy)(logits, targets, mask)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    assert loss.dtype == jnp.float32
    assert float(loss) == pytest.approx(float((per_token * mask).sum() / 7), rel=1e-6)
    correct = np.asarray(jnp.argmax(logits, -1) == targets) * np.asarray(mask)
    assert float(aux["tokens"]) == 7 and float(aux["accuracy"]) == pytest.approx(correct.sum() / 7)

    nothing_counted = jax.value_and_grad(lambda x: cross_entropy(x, targets, jnp.zeros_like(mask))[0])
    empty, grads = jax.jit(nothing_counted)(logits)
    assert float(empty) == 0 and np.isfinite(np.asarray(grads)).all()


def test_the_lm_loss_passes_packing_through_so_a_packed_row_scores_as_its_documents():
    params = jax.jit(lambda key: decoder.init_params(CONFIG, key, scale=0.1))(jax.random.key(0))
    loss_fn = jax.jit(causal_lm_loss(CONFIG))
    first, second = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 8))
    first, second = first[:7], second[:5]  # documents of 7 and 5 tokens: 6 and 4 next-token targets

    def batch(row, **packing):
        return {"inputs": jnp.asarray(row[None, :-1], jnp.int32), "targets": jnp.asarray(row[None, 1:], jnp.int32),
                "loss_mask": jnp.ones((1, len(row) - 1), jnp.float32), **packing}

    loss_first, _ = loss_fn(params, batch(first), None)
    loss_second, _ = loss_fn(params, batch(second), None)
    packed = batch(np.concatenate([first, second]),  # 11 inputs: 7 of the first document, 4 of the second
                   segment_ids=jnp.asarray([[1] * 7 + [2] * 4], jnp.int32),
                   positions=jnp.asarray([list(range(7)) + list(range(4))], jnp.int32))
    packed["loss_mask"] = packed["loss_mask"].at[0, 6].set(0)  # the first document's last token predicts nothing
    loss_packed, aux = loss_fn(params, packed, None)
    assert float(aux["tokens"]) == 10
    assert float(loss_packed) == pytest.approx((6 * float(loss_first) + 4 * float(loss_second)) / 10, rel=1e-5)


# ----------------------------------------------------------------------------- the optimizer


def test_schedules_warm_up_then_decay_to_the_minimum():
    base = dict(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cosine = learning_rate_schedule(OptimizerConfig(**base, schedule="cosine"))
    linear = learning_rate_schedule(OptimizerConfig(**base, schedule="linear"))
    constant = learning_rate_schedule(OptimizerConfig(**base, schedule="constant"))
    for schedule in (cosine, linear, constant):
        assert float(schedule(0)) == 0
        assert float(schedule(5)) == pytest.approx(0.5) and float(schedule(10)) == pytest.approx(1)
    assert float(cosine(60)) == pytest.approx(0.55) and float(cosine(110)) == pytest.approx(0.1)
    assert float(linear(35)) == pytest.approx(0.775) and float(linear(500)) == pytest.approx(0.1)
    assert float(constant(500)) == 1
    no_warmup = learning_rate_schedule(OptimizerConfig(learning_rate=1.0, total_steps=100))
    assert float(no_warmup(0)) == 1


def test_weight_decay_skips_norms_biases_and_embeddings():
    config = dataclasses.replace(CONFIG, qkv_bias=True)
    params = jax.jit(lambda key: decoder.init_params(config, key))(jax.random.key(0))
    optimizer = make_optimizer(
        OptimizerConfig(learning_rate=0.5, weight_decay=0.1, clip_norm=None, schedule="constant"))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)  # only the decay moves anything
    decayed = {n for n, u in zip(parameter_names(params), jax.tree.leaves(updates)) if np.any(np.asarray(u))}
    assert decayed == {"layers/q/kernel", "layers/k/kernel", "layers/v/kernel", "layers/o/kernel",
                       "layers/gate/kernel", "layers/up/kernel", "layers/down/kernel", "lm_head/kernel"}
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.5 * 0.1 * params["lm_head"]["kernel"], rtol=1e-6)


def test_optimizer_config_loads_from_yaml_values_and_rejects_bad_ones():
    loaded = config_lib.from_dict(OptimizerConfig, {"learning_rate": 1e-3, "schedule": "linear", "clip_norm": None,
                                                    "no_decay": [".*norm.*"]})
    assert loaded == OptimizerConfig(learning_rate=1e-3, schedule="linear", clip_norm=None, no_decay=(".*norm.*",))
    assert config_lib.apply_overrides(loaded, ["warmup_steps=10"]).warmup_steps == 10
    with pytest.raises(config_lib.ConfigError, match="schedule"):
        config_lib.from_dict(OptimizerConfig, {"schedule": "step"})
    with pytest.raises(config_lib.ConfigError, match="total_steps=10 must exceed warmup_steps=10"):
        config_lib.from_dict(OptimizerConfig, {"warmup_steps": 10, "total_steps": 10})
