"""SmoothQuant: the smoothed float model computes the same function, and its w8a8 quantization
is closer to float than plain w8a8 when a few input channels carry outliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import decoder
from compress.quant import schemes, smooth
from compress.quant.weights import quantize_params

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16)


def _model_with_outlier_channels():
    params = decoder.init_params(CONFIG, jax.random.key(0), scale=0.2)
    # A few residual channels 30x larger than the rest, through the norms, as trained LLMs have.
    boost = jnp.ones(CONFIG.embed_dim).at[jnp.array([3, 17, 40])].set(30.0)
    layers = dict(params["layers"])
    layers["attn_norm"] = layers["attn_norm"] * boost
    layers["mlp_norm"] = layers["mlp_norm"] * boost
    return {**params, "layers": layers}


def _tokens(seed, rows=8):
    return np.asarray(jax.random.randint(jax.random.key(seed), (rows, 24), 0, CONFIG.vocab_size))


def test_smoothing_keeps_the_float_function_and_helps_w8a8():
    params = _model_with_outlier_channels()
    absmax = smooth.activation_absmax(params, CONFIG, _tokens(1), batch_size=4)
    assert absmax["attn"].shape == (2, 64) and absmax["down"].shape == (2, 128)
    assert float(absmax["attn"][0, 3]) > 5 * float(np.median(absmax["attn"][0]))  # the outliers were seen
    smoothed = smooth.smooth(params, absmax, alpha=0.5)

    tokens = _tokens(2)  # text calibration never saw
    want = decoder.forward(params, tokens, CONFIG).logits
    # The same function up to float32 rounding of the rescaled weights (logits of magnitude ~2;
    # jax 0.10.x on this CPU differs by up to 1.7e-4 in 2 of 24,576 logits).
    np.testing.assert_allclose(np.asarray(decoder.forward(smoothed, tokens, CONFIG).logits), np.asarray(want),
                               rtol=1e-4, atol=5e-4)
    w8a8 = schemes.get("w8a8")
    error = lambda p: float(jnp.mean((decoder.forward(quantize_params(p, decoder.PROJECTIONS, w8a8), tokens,
                                                       CONFIG).logits - want) ** 2))
    assert error(smoothed) < 0.5 * error(params)


def test_alpha_zero_and_scheme_table():
    params = _model_with_outlier_channels()
    absmax = smooth.activation_absmax(params, CONFIG, _tokens(1), batch_size=8)
    # alpha = 0 divides by max|W| only: the norms change, the function does not.
    same = smooth.smooth(params, absmax, alpha=0.0)
    assert not np.allclose(np.asarray(same["layers"]["attn_norm"]), np.asarray(params["layers"]["attn_norm"]))
    tokens = _tokens(3)
    np.testing.assert_allclose(np.asarray(decoder.forward(same, tokens, CONFIG).logits),
                               np.asarray(decoder.forward(params, tokens, CONFIG).logits), rtol=1e-4, atol=1e-4)
    scheme = schemes.get("smooth-w8a8")
    assert scheme.calibration == "smoothquant" and scheme.activation_bits == 8 and scheme.weight_bits == 8
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        smooth.smooth(params, absmax, alpha=1.5)
