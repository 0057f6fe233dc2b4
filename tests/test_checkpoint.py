"""Orbax checkpoints of sharded parameter trees: async saves, max_to_keep, other meshes, clear errors."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import checkpoint as ckpt
from compress import sharding as shd
from compress.models import decoder

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
SHAPES = decoder.param_shapes(CONFIG)
AXES = decoder.param_axes(CONFIG)


def _params(mesh, seed=0):
    shardings = shd.tree_shardings(mesh, AXES, SHAPES)
    return jax.jit(lambda k: decoder.init_params(CONFIG, k, scale=0.2), out_shardings=shardings)(jax.random.key(seed))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_restore_onto_other_meshes(tmp_path):
    saved_mesh = shd.make_mesh(2, 2, 2)
    params = _params(saved_mesh)
    with ckpt.Checkpointer(tmp_path, async_save=True) as c:
        c.save(10, params, metadata=dataclasses.asdict(CONFIG))
        c.wait()
    tokens = jnp.arange(16).reshape(2, 8) % CONFIG.vocab_size
    expected = decoder.forward(params, tokens, CONFIG).logits
    for mesh in (shd.make_mesh(1, 8, 1), shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
        with ckpt.Checkpointer(tmp_path) as c:  # a fresh process would do the same
            restored = c.restore(shapes=SHAPES, mesh=mesh, axes=AXES)
            assert c.restore_metadata()["embed_dim"] == CONFIG.embed_dim
        _assert_same(restored, params)
        wanted = shd.tree_shardings(mesh, AXES, SHAPES)
        for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(wanted)):
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        got = decoder.forward(restored, tokens, CONFIG).logits
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5)  # other reduction order


def test_max_to_keep_and_step_order(tmp_path):
    mesh = shd.make_mesh(1, 8, 1)
    params = _params(mesh)
    with ckpt.Checkpointer(tmp_path, max_to_keep=2) as c:
        for step in (1, 2, 3, 4):
            c.save(step, params)
        c.wait()
        assert c.all_steps() == [3, 4] and c.latest_step() == 4
        with pytest.raises(ValueError, match="step 4 already exists"):
            c.save(4, params)
        with pytest.raises(ValueError, match="older than the latest step 4"):
            c.save(2, params)
    assert sorted(p for p in os.listdir(tmp_path) if p.isdigit()) == ["3", "4"]


def test_missing_checkpoints_say_where_and_what_exists(tmp_path):
    with pytest.raises(ckpt.CheckpointNotFoundError, match="the directory is empty"):
        ckpt.Checkpointer(tmp_path / "empty").restore(shapes=SHAPES, mesh=shd.make_mesh(1, 8, 1), axes=AXES)
    mesh = shd.make_mesh(1, 8, 1)
    with ckpt.Checkpointer(tmp_path / "run") as c:
        c.save(5, _params(mesh), wait=True)
        with pytest.raises(ckpt.CheckpointNotFoundError, match=r"no checkpoint step 7 .*available steps: \[5\]"):
            c.restore(7, shapes=SHAPES, mesh=mesh, axes=AXES)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="does not exist"):
        ckpt.load_params(tmp_path / "nowhere", SHAPES, shd.tree_shardings(mesh, AXES, SHAPES))


def test_corrupt_latest_step_fails_clearly_and_earlier_steps_survive(tmp_path):
    mesh = shd.make_mesh(1, 8, 1)
    first, second = _params(mesh, seed=1), _params(mesh, seed=2)
    with ckpt.Checkpointer(tmp_path, max_to_keep=3) as c:
        c.save(1, first)
        c.save(2, second)
        c.wait()
    # Damage every data file of step 2.
    damaged = 0
    for root, _, files in os.walk(tmp_path / "2"):
        for name in files:
            if "metadata" in name or name.endswith(".json"):
                continue
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
                damaged += 1
    assert damaged
    with ckpt.Checkpointer(tmp_path) as c:
        with pytest.raises(ckpt.CorruptCheckpointError, match=r"step 2 .*could not be read.*other steps here: \[1\]"):
            c.restore(shapes=SHAPES, mesh=mesh, axes=AXES)
        _assert_same(c.restore(1, shapes=SHAPES, mesh=mesh, axes=AXES), first)


def test_restoring_another_models_shapes_names_the_keys(tmp_path):
    mesh = shd.make_mesh(1, 8, 1)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(1, _params(mesh), wait=True)
        wider = dataclasses.replace(CONFIG, mlp_dim=256)
        with pytest.raises(ckpt.CheckpointMismatchError, match=r"layers/up/kernel saved \(2, 64, 128\) requested \(2, 64, 256\)"):
            c.restore(shapes=decoder.param_shapes(wider), mesh=mesh, axes=decoder.param_axes(wider))
        untied = dataclasses.replace(CONFIG, tie_word_embeddings=not CONFIG.tie_word_embeddings)
        with pytest.raises(ckpt.CheckpointMismatchError, match="lm_head"):
            c.restore(shapes=decoder.param_shapes(untied), mesh=mesh, axes=decoder.param_axes(untied))


def test_restore_converts_dtype(tmp_path):
    mesh = shd.make_mesh(1, 8, 1)
    params = _params(mesh)
    with ckpt.Checkpointer(tmp_path) as c:
        c.save(1, params, wait=True)
        bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), SHAPES)
        restored = c.restore(shapes=bf16, mesh=mesh, axes=AXES)
    leaf = restored["layers"]["q"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(leaf, np.float32), np.asarray(params["layers"]["q"]["kernel"]), rtol=1e-2)


def test_save_params_round_trip_and_never_overwrites(tmp_path):
    mesh = shd.make_mesh(2, 2, 2)
    params = _params(mesh)
    ckpt.save_params(tmp_path / "p", params)
    shardings = shd.tree_shardings(shd.make_mesh(1, 1, 8), AXES, SHAPES)
    _assert_same(ckpt.load_params(tmp_path / "p", SHAPES, shardings), params)
    with pytest.raises(FileExistsError, match="never overwrites"):
        ckpt.save_params(tmp_path / "p", params)


def test_restore_right_after_an_async_save_waits_for_it(tmp_path):
    mesh = shd.make_mesh(1, 8, 1)
    params = _params(mesh)
    with ckpt.Checkpointer(tmp_path, async_save=True) as c:
        c.save(100, params)  # no wait
        _assert_same(c.restore(shapes=SHAPES, mesh=mesh, axes=AXES), params)
