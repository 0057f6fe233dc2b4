"""Quantization-aware training: the served numerics in the forward pass, straight-through
gradients, and a short optax loop that lowers the quantized model's loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from compress.models import decoder
from compress.quant import qat, schemes
from compress.quant.weights import dequantize_kernel, quantize_params

CONFIG = decoder.DecoderConfig(vocab_size=64, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
TOKENS = jax.random.randint(jax.random.key(1), (4, 16), 0, CONFIG.vocab_size)


def _params():
    return decoder.init_params(CONFIG, jax.random.key(0), scale=0.1)


@pytest.mark.parametrize("name, tolerance", [("int8", 1e-5), ("w8a8", 1e-4), ("int4-g32-asym", 1e-4), ("int4-g32", 2e-2)])
def test_training_forward_is_the_served_model(name, tolerance):
    """QAT's forward computes what `press quantize` serves (int4-g32: codes may differ only
    where float16 group scales move a value across a rounding boundary; w8a8: an activation's
    code where x / step lies within a rounding error of a half, which XLA's code generation
    decides: 4.4e-5 with its older fusion emitters, under 1e-5 with the newer)."""
    params, scheme = _params(), schemes.get(name)
    served = decoder.forward(quantize_params(params, decoder.PROJECTIONS, scheme), TOKENS, CONFIG).logits
    trained = decoder.forward(qat.fake_quantize(params, decoder.PROJECTIONS, scheme), TOKENS, CONFIG).logits
    float_logits = decoder.forward(params, TOKENS, CONFIG).logits
    gap = float(jnp.abs(served - trained).mean() / jnp.abs(served).mean())
    assert gap <= tolerance, gap
    assert float(jnp.abs(float_logits - trained).max()) > 0  # it really is quantized


def test_gradients_are_straight_through():
    """d loss / d kernel under int8 QAT = the float gradient at the dequantized kernels."""
    params, scheme = _params(), schemes.get("int8")

    def loss(p, tokens=TOKENS):
        logits = decoder.forward(p, tokens, CONFIG).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    got = jax.grad(lambda p: loss(qat.fake_quantize(p, decoder.PROJECTIONS, scheme)))(params)
    deq = jax.tree.map(lambda x: x, params)
    q = quantize_params(params, decoder.PROJECTIONS, scheme)
    for n in ("q", "k", "v", "o", "gate", "up", "down"):
        deq["layers"][n] = {"kernel": dequantize_kernel(q["layers"][n], decoder.PROJECTIONS[n])}
    want = jax.grad(loss)(deq)
    np.testing.assert_allclose(np.asarray(got["layers"]["down"]["kernel"]), np.asarray(want["layers"]["down"]["kernel"]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["embed"]), np.asarray(want["embed"]), atol=1e-6)
    assert jax.tree.structure(got) == jax.tree.structure(params)  # the optimizer sees the float tree


def test_optax_loop_lowers_the_quantized_models_loss():
    """Train on a fixed pattern with int4-g32 QAT; the *stored-integer* model's loss falls."""
    scheme = schemes.get("int4-g32")
    data = (jnp.arange(16)[None, :] * 3 + jnp.arange(8)[:, None] * 7) % CONFIG.vocab_size  # [8, 16] learnable sequences

    def loss(p, tokens):
        logits = decoder.forward(p, tokens, CONFIG).logits[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def served_loss(p):
        return float(loss(quantize_params(p, decoder.PROJECTIONS, scheme), data))

    optimizer = optax.adam(3e-3)

    @jax.jit
    def step(state, tokens):
        p, opt = state
        value, grads = jax.value_and_grad(lambda p: loss(qat.fake_quantize(p, decoder.PROJECTIONS, scheme), tokens))(p)
        updates, opt = optimizer.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), value

    params = _params()
    before = served_loss(params)
    state = (params, optimizer.init(params))
    for _ in range(60):
        state, _ = step(state, data)
    after = served_loss(state[0])
    assert after < 0.5 * before, (before, after)


def test_keep_float_and_calibrated_schemes_in_training():
    params = _params()
    marked = qat.fake_quantize(params, decoder.PROJECTIONS, schemes.get("gptq-int4-g32").with_keep_float(["layers/o"]))
    assert "spec" not in marked["layers"]["o"] and marked["layers"]["q"]["spec"].fake
    assert marked["layers"]["q"]["kernel"] is params["layers"]["q"]["kernel"]
    assert qat.fake_quantize(params, decoder.PROJECTIONS, schemes.get("kv-int8")) is params
