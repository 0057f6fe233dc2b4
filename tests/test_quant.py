"""int8 weight quantization through AQT: round-trip bounds, logits near float, integer storage, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import sharding as shd
from compress.models import decoder
from compress.quant import aqt_matmul, schemes
from compress.quant.weights import dequantize_kernel, quantize_kernel, quantize_params, quantized_axes

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8)
INT8 = schemes.get("int8")


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown quantization scheme 'int3'; valid schemes: int8 \("):
        schemes.get("int3")


def test_round_trip_error_is_at_most_half_a_step_per_channel():
    w = jax.random.normal(jax.random.key(0), (3, 64, 8, 16)) * jnp.linspace(0.1, 3, 16)  # channels of different range
    axes = (1,)  # the contracted (input) axis of a stacked [L, D, N, H] kernel
    q = quantize_kernel(w, axes, INT8)
    assert q["qkernel"].dtype == jnp.int8 and q["scale"].shape == (3, 1, 8, 16)
    err = jnp.abs(dequantize_kernel(q) - w)
    assert bool(jnp.all(err <= q["scale"] / 2 + 1e-7))
    assert int(jnp.abs(q["qkernel"]).max()) == 127


def test_integer_einsum_matches_dequantized_float():
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 8))
    w = jax.random.normal(jax.random.key(2), (6, 8, 32))
    q = quantize_kernel(w, (0, 1), INT8)
    got = aqt_matmul.int_weight_einsum("BTNH,NHD->BTD", x, q["qkernel"], q["scale"], bits=8)
    want = jnp.einsum("BTNH,NHD->BTD", x, dequantize_kernel(q))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="output must be ordered"):
        aqt_matmul.einsum_dimension_numbers("BTD,DF->BFT")


def _quantized_model():
    params = decoder.init_params(CONFIG, jax.random.key(0), scale=0.2)
    return params, quantize_params(params, decoder.PROJECTIONS, INT8)


def test_quantized_tree_holds_integers_and_logits_stay_close():
    params, qparams = _quantized_model()
    layers = qparams["layers"]
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        assert layers[name]["qkernel"].dtype == jnp.int8 and "kernel" not in layers[name]
    assert qparams["embed"].dtype == jnp.float32  # a lookup, never quantized
    tokens = jax.random.randint(jax.random.key(3), (4, 16), 0, CONFIG.vocab_size)
    got = decoder.forward(qparams, tokens, CONFIG).logits
    # The integer matmuls compute exactly the model whose kernels are the dequantized integers ...
    dequantized = jax.tree.map(lambda x: x, params)
    for name in ("q", "k", "v", "o", "gate", "up", "down"):
        dequantized["layers"][name] = {"kernel": dequantize_kernel(layers[name])}
    np.testing.assert_allclose(np.asarray(got), np.asarray(decoder.forward(dequantized, tokens, CONFIG).logits), atol=1e-4)
    # ... which stays close to the float model.
    want = decoder.forward(params, tokens, CONFIG).logits
    assert float(jnp.abs(got - want).mean() / jnp.abs(want).mean()) < 0.05
    assert float(jnp.mean(got.argmax(-1) == want.argmax(-1))) > 0.95
    projection_bytes = sum(layers[n]["qkernel"].nbytes + layers[n]["scale"].nbytes for n in ("q", "gate", "down"))
    float_bytes = sum(params["layers"][n]["kernel"].nbytes for n in ("q", "gate", "down"))
    assert projection_bytes / float_bytes < 0.3  # int8 + scales vs fp32 (about 1/2 of bf16)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_params(qparams, decoder.PROJECTIONS, INT8)


def test_untied_lm_head_stays_float_by_default():
    import dataclasses

    untied = dataclasses.replace(CONFIG, tie_word_embeddings=False)
    q = quantize_params(decoder.init_params(untied, jax.random.key(0)), decoder.PROJECTIONS, INT8)
    assert "kernel" in q["lm_head"] and q["lm_head"]["kernel"].dtype == jnp.float32


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 1, 8)])
def test_sharded_quantized_forward_equals_single_device(mesh_shape):
    _, qparams = _quantized_model()
    tokens = jax.random.randint(jax.random.key(4), (8, 12), 0, CONFIG.vocab_size)
    want = decoder.forward(qparams, tokens, CONFIG).logits
    mesh = shd.make_mesh(*mesh_shape)
    axes = quantized_axes(decoder.param_axes(CONFIG), qparams)
    sharded = jax.device_put(qparams, shd.tree_shardings(mesh, axes, qparams))
    assert sharded["layers"]["q"]["qkernel"].dtype == jnp.int8
    got = jax.jit(lambda p, t: decoder.forward(p, t, CONFIG).logits)(
        sharded, jax.device_put(tokens, shd.batch_sharding(mesh, 2, tokens.shape))
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=0)
