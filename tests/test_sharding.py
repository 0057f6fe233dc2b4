"""Sharded forward passes on 8 simulated CPU devices equal the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from compress import sharding as shd
from compress.errors import InputError
from compress.models import decoder
from compress.pretrained import load_decoder
from tests.reference import tiny_hf_model

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
MESHES = {"fsdp8": (1, 8, 1), "data2-fsdp2-tensor2": (2, 2, 2), "data4-tensor2": (4, 1, 2), "tensor8": (1, 1, 8)}


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


def test_rules_table_maps_logical_axes():
    mesh = shd.make_mesh(2, 2, 2)
    assert shd.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 64, 8, 8), mesh) == P(None, "fsdp", "tensor", None)
    assert shd.logical_to_spec(("batch", "seq"), (8, 16), mesh) == P(("data", "fsdp"), None)
    # 3 KV heads cannot be split over a tensor axis of 2: replicated instead of failing.
    assert shd.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 3, 8), mesh) == P(None, "fsdp", None, None)
    with pytest.raises(KeyError, match="logical axis 'bogus' has no sharding rule"):
        shd.logical_to_spec(("bogus",))
    with pytest.raises(ValueError, match="needs 12 devices, 8 are available"):
        shd.make_mesh(3, 2, 2)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_equals_single_device(mesh_name):
    mesh = shd.make_mesh(*MESHES[mesh_name])
    params = decoder.init_params(CONFIG, jax.random.key(0), scale=0.2)
    tokens = jax.random.randint(jax.random.key(1), (8, 12), 0, CONFIG.vocab_size)
    mask = jnp.ones((8, 12), jnp.int32).at[3, :4].set(0)
    expected = decoder.forward(params, tokens, CONFIG, attention_mask=mask).logits

    # Parameters created directly in their sharded layout: eval_shape, then jit with out_shardings.
    shardings = shd.tree_shardings(mesh, decoder.param_axes(CONFIG), jax.eval_shape(lambda: params))
    sharded = jax.jit(lambda k: decoder.init_params(CONFIG, k, scale=0.2), out_shardings=shardings)(jax.random.key(0))
    assert sharded["layers"]["q"]["kernel"].sharding == shardings["layers"]["q"]["kernel"]
    batch = shd.batch_sharding(mesh, 2, tokens.shape)
    fn = jax.jit(lambda p, t, m: decoder.forward(p, t, CONFIG, attention_mask=m).logits)
    got = fn(sharded, jax.device_put(tokens, batch), jax.device_put(mask, batch))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=0)


def test_loading_places_each_tensor_on_its_shard(tmp_path):
    model = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    single = load_decoder(str(tmp_path), with_tokenizer=False)
    mesh = shd.make_mesh(2, 2, 2)
    sharded = load_decoder(str(tmp_path), mesh=mesh, with_tokenizer=False)
    q = sharded.params["layers"]["q"]["kernel"]  # [L, D, N, H]
    assert isinstance(q.sharding, NamedSharding) and q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert {s.data.shape for s in q.addressable_shards} == {(3, 32, 2, 16)}
    jax.tree.map(np.testing.assert_array_equal, sharded.params, single.params)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 10)))
    got = jax.jit(lambda p, t: decoder.forward(p, t, sharded.config).logits)(sharded.params, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(decoder.forward(single.params, tokens, single.config).logits), atol=2e-5)


def test_bfloat16_parameters_and_compute():
    c16 = decoder.DecoderConfig(**{**CONFIG.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16"})
    params = decoder.init_params(c16, jax.random.key(0), scale=0.2)
    assert params["layers"]["up"]["kernel"].dtype == jnp.bfloat16
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, CONFIG.vocab_size)
    out = decoder.forward(params, tokens, c16).logits
    ref = decoder.forward(jax.tree.map(lambda x: x.astype(jnp.float32), params), tokens, CONFIG).logits
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()


def test_a_run_chooses_its_rules():
    mesh = shd.make_mesh(1, 4, 2)
    # Pure FSDP over the MLP width instead of the embedding, with tensor parallelism off.
    rules = tuple((name, None) for name, _ in shd.RULES if name not in ("mlp", "batch")) + (
        ("mlp", "fsdp"), ("batch", ("data", "fsdp")))
    axes, shapes = decoder.param_axes(CONFIG), decoder.param_shapes(CONFIG)
    custom = shd.tree_shardings(mesh, axes, shapes, rules=rules)
    default = shd.tree_shardings(mesh, axes, shapes)
    assert custom["layers"]["up"]["kernel"].spec == P(None, None, "fsdp")
    assert custom["layers"]["q"]["kernel"].spec == P(None, None, None, None)
    assert default["layers"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shd.batch_sharding(mesh, 2, (8, 3), rules=rules).spec == P("fsdp", None)


def test_strict_sharding_names_the_tensor_instead_of_replicating():
    mesh = shd.make_mesh(2, 2, 2)
    config = decoder.DecoderConfig(**{**CONFIG.__dict__, "num_heads": 6, "num_kv_heads": 3})
    axes, shapes = decoder.param_axes(config), decoder.param_shapes(config)
    loose = shd.tree_shardings(mesh, axes, shapes)  # the default: 3 KV heads replicated over tensor=2
    assert loose["layers"]["k"]["kernel"].spec == P(None, "fsdp", None, None)
    with pytest.raises(InputError) as caught:
        shd.tree_shardings(mesh, axes, shapes, strict=True)
    assert str(caught.value).startswith(
        "layers/k/kernel (2, 64, 3, 8): dimension 2 ('kv_heads', size 3) cannot be split over mesh axis tensor=2 "
        "(3 is not a multiple of 2)")
    with pytest.raises(InputError, match=r"^x \(6,\): dimension 0 \('batch', size 6\) cannot be split over mesh axis "
                                         r"data=2 x fsdp=2"):
        shd.logical_to_spec(("batch",), (6,), mesh, strict=True, name="x")
    # Mesh axes of size 1 never need dividing.
    assert shd.logical_to_spec(("kv_heads",), (3,), shd.make_mesh(1, 8, 1), strict=True) == P(None)
