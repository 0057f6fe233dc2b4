"""GPTQ: lower output error than round to nearest, the same storage, round to nearest when nothing correlates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import decoder
from compress.quant import gptq, schemes
from compress.quant.weights import dequantize_kernel, integer_codes, quantize_kernel, quantize_params

DENSE = "BTD,DF->BTF"
# Every projection of this decoder is 64 x 64, so one GPTQ program serves them all.
CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=64, num_layers=2, num_heads=4, num_kv_heads=4,
                               head_dim=16)
CALIBRATION = gptq.GPTQConfig(batch_size=4)


def _correlated_inputs(tokens: int, width: int, seed: int = 0) -> jnp.ndarray:
    """[M, I] activations whose inputs mix a few strong directions (as real activations do)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    mixing = jax.random.normal(k2, (width, width)) * jnp.exp(-jnp.arange(width) / 30.0)[:, None]  # [I, I]
    return jax.random.normal(k1, (tokens, width)) @ mixing + 0.1 * jax.random.normal(k3, (tokens, width))


def _output_error(x: jnp.ndarray, kernel: jnp.ndarray, stored: dict) -> float:
    return float(jnp.sum((x @ (kernel - dequantize_kernel(stored, DENSE))) ** 2))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["int4-g32", "int4-g32-asym"])
def test_output_error_is_well_below_round_to_nearest(name, act_order):
    rtn_scheme, gptq_scheme = schemes.get(name), schemes.get("gptq-" + name)
    x = _correlated_inputs(4096, 192)  # 192 inputs: one and a half lazy-update blocks
    kernel = jax.random.normal(jax.random.key(1), (192, 48))
    stored, finite = gptq.gptq_kernel(kernel, DENSE, x.T @ x / x.shape[0], gptq_scheme,
                                      dataclasses.replace(CALIBRATION, act_order=act_order))
    rtn = quantize_kernel(kernel, (0,), rtn_scheme)
    assert bool(finite)
    assert _output_error(x, kernel, stored) < 0.3 * _output_error(x, kernel, rtn)

    # Stored exactly like round to nearest: int4 codes, float16 scales, and they decode to codes * scale (+ offset).
    assert jax.tree.map(lambda a: (a.shape, a.dtype), stored) == jax.tree.map(lambda a: (a.shape, a.dtype), rtn)
    codes = np.asarray(integer_codes(stored, DENSE), np.int32).reshape(6, 32, 48)  # [G, N, O]
    low, high = (0, 15) if rtn_scheme.zero_point else (-8, 7)
    assert codes.min() >= low and codes.max() <= high
    want = codes * np.asarray(stored["group_scale"], np.float32)[:, None]
    if "group_offset" in stored:
        want = want + np.asarray(stored["group_offset"], np.float32)[:, None]
    np.testing.assert_array_equal(np.asarray(dequantize_kernel(stored, DENSE)), want.reshape(192, 48))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", ["int4-g32", "int4-g32-asym"])
def test_uncorrelated_inputs_give_round_to_nearest_exactly(name, act_order):
    # H = I: no input's error can be made up by another, so GPTQ has nothing to compensate.
    # A three-axis kernel [N, H, D] also checks the inputs are flattened as storage groups them.
    kernel = jax.random.normal(jax.random.key(2), (12, 16, 48))
    stored, _ = gptq.gptq_kernel(kernel, "BTNH,NHD->BTD", jnp.eye(192), schemes.get("gptq-" + name),
                                 dataclasses.replace(CALIBRATION, act_order=act_order, clip_search=0))
    rtn = quantize_kernel(kernel, (0, 1), schemes.get(name))
    assert set(stored) == set(rtn)
    for key in ("qkernel", "group_scale", "group_offset"):
        if key in rtn:
            np.testing.assert_array_equal(np.asarray(stored[key].astype(jnp.float32)), np.asarray(rtn[key].astype(jnp.float32)))


def test_inputs_never_active_and_invalid_hessians():
    x = _correlated_inputs(2048, 192).at[:, 10:20].set(0.0)  # ten inputs that calibration never sees
    kernel = jax.random.normal(jax.random.key(3), (192, 48))
    scheme = schemes.get("gptq-int4-g32")
    stored, finite = gptq.gptq_kernel(kernel, DENSE, x.T @ x / x.shape[0], scheme, CALIBRATION)
    assert bool(finite) and bool(jnp.all(jnp.isfinite(dequantize_kernel(stored, DENSE))))
    assert _output_error(x, kernel, stored) < 0.5 * _output_error(x, kernel, quantize_kernel(kernel, (0,), scheme))
    # A Hessian that is not positive semi-definite cannot come from activations: reported, not hidden.
    _, finite = gptq.gptq_kernel(kernel, DENSE, -jnp.eye(192), scheme, CALIBRATION)
    assert not bool(finite)
    with pytest.raises(ValueError, match="block_size=48 is not a multiple of the group size 32"):
        gptq.gptq_kernel(kernel, DENSE, jnp.eye(192), scheme, dataclasses.replace(CALIBRATION, block_size=48))
    with pytest.raises(ValueError, match="GPTQConfig.damping must be a positive number"):
        gptq.GPTQConfig(damping=0)


def _tiny_model(config=CONFIG):
    params = decoder.init_params(config, jax.random.key(0), scale=0.2)
    # Embeddings near a low-rank subspace, so activations correlate as in trained models.
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    params["embed"] = (jax.random.normal(k1, (config.vocab_size, 8)) @ jax.random.normal(k2, (8, config.embed_dim))
                       + 0.3 * jax.random.normal(k3, (config.vocab_size, config.embed_dim)))
    return params


def _tokens(seed: int, rows: int) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (rows, 32), 0, CONFIG.vocab_size))


def _logit_error(params, qparams, tokens, config=CONFIG) -> float:
    want = decoder.forward(params, tokens, config).logits
    return float(jnp.mean((decoder.forward(qparams, tokens, config).logits - want) ** 2))


def test_decoder_is_stored_like_round_to_nearest_and_closer_to_float():
    params = _tiny_model()
    calibration = _tokens(1, 16)
    qparams = gptq.quantize_decoder_tokens(params, CONFIG, schemes.get("gptq-int4-g32"), calibration, CALIBRATION)
    rtn = quantize_params(params, decoder.PROJECTIONS, schemes.get("int4-g32"))
    layout = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert jax.tree.structure(qparams) == jax.tree.structure(rtn) and layout(qparams) == layout(rtn)
    assert qparams["layers"]["q"]["qkernel"].dtype == jnp.int8 and qparams["layers"]["q"]["spec"].weight_bits == 4
    # Through the integer matmuls, on the calibration sequences and on sequences it never saw.
    for tokens in (calibration, _tokens(2, 8)):
        assert _logit_error(params, qparams, tokens) < 0.6 * _logit_error(params, rtn, tokens)


def test_keep_float_patterns_are_honoured():
    config = dataclasses.replace(CONFIG, tie_word_embeddings=False, vocab_size=64)  # lm_head [64, 64]
    params = _tiny_model(config)
    scheme = schemes.get("gptq-int4-g32-asym").with_keep_float(["layers/down"])  # lm_head quantized too
    tokens = _tokens(1, 8) % config.vocab_size
    qparams = gptq.quantize_decoder_tokens(params, config, scheme, tokens, CALIBRATION)
    assert set(qparams["layers"]["down"]) == {"kernel"}
    np.testing.assert_array_equal(np.asarray(qparams["layers"]["down"]["kernel"]),
                                  np.asarray(params["layers"]["down"]["kernel"]))
    for path in (qparams["layers"]["up"], qparams["lm_head"]):
        assert path["spec"].zero_point and path["group_offset"].dtype == jnp.float16
    rtn = quantize_params(params, decoder.PROJECTIONS, schemes.get("int4-g32-asym").with_keep_float(["layers/down"]))
    assert jax.tree.structure(qparams) == jax.tree.structure(rtn)
    assert _logit_error(params, qparams, tokens, config) < _logit_error(params, rtn, tokens, config)
    with pytest.raises(ValueError, match="keep-float pattern 'layers/dwn' matches no projection"):
        gptq.quantize_decoder_tokens(params, config, scheme.with_keep_float(["layers/dwn"]), tokens, CALIBRATION)


def test_calibration_windows_are_seeded_and_come_from_the_train_text():
    from compress.data.corpus import pydoc_split

    def characters(text, verbose=False):  # a tokenizer whose tokens are characters
        return {"input_ids": [ord(c) for c in text]}

    config = gptq.GPTQConfig(num_sequences=6, sequence_length=80, seed=3)
    windows = gptq.calibration_tokens(characters, config)
    assert windows.shape == (6, 80) and windows.dtype == np.int32
    np.testing.assert_array_equal(windows, gptq.calibration_tokens(characters, config))
    assert not np.array_equal(windows, gptq.calibration_tokens(characters, dataclasses.replace(config, seed=4)))
    train, held_out = pydoc_split()
    for row in windows:
        assert "".join(map(chr, row)) in train
    with pytest.raises(ValueError, match="fewer than GPTQConfig.sequence_length=80"):
        gptq.calibration_tokens(lambda text, verbose=False: {"input_ids": [1] * 10}, config)


@pytest.mark.parametrize("name", ["int4-g32", "int4-g32-asym"])
def test_clip_search_never_rounds_a_group_worse(name):
    # With H = I there is no compensation, so each group's error is that of its grid alone:
    # the searched grid (which includes the unshrunk one) is never worse, and wins overall.
    kernel = jax.random.t(jax.random.key(5), 3.0, (192, 48))  # heavy tails: clipping pays
    config = dataclasses.replace(CALIBRATION, act_order=False, clip_search=20)
    searched, _ = gptq.gptq_kernel(kernel, DENSE, jnp.eye(192), schemes.get("gptq-" + name), config)
    plain = quantize_kernel(kernel, (0,), schemes.get(name))
    group_error = lambda stored: jnp.sum(((dequantize_kernel(stored, DENSE) - kernel) ** 2).reshape(6, 32, 48), axis=1)
    assert bool(jnp.all(group_error(searched) <= group_error(plain) * (1 + 1e-5)))
    assert float(jnp.sum(group_error(searched))) < 0.97 * float(jnp.sum(group_error(plain)))
    with pytest.raises(ValueError, match="GPTQConfig.clip_search must be an integer >= 0"):
        gptq.GPTQConfig(clip_search=-1)


def test_press_quantize_passes_its_calibration_settings(tmp_path, capsys):
    from compress.formats import hf_decoder
    from compress.pretrained import load_decoder
    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer
    from serve import cli

    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    config = dataclasses.replace(CONFIG, vocab_size=len(tokenizer), architecture="llama",
                                 eos_token_ids=(tokenizer.eos_token_id,), bos_token_id=tokenizer.bos_token_id)
    model = str(tmp_path / "tiny")
    hf_decoder.export(decoder.init_params(config, jax.random.key(0), scale=0.2), config, model, tokenizer=tokenizer)
    text = tmp_path / "notes.txt"
    text.write_text("Tea keeps its flavour in an airtight tin, away from light and warmth. " * 40)
    argv = ["quantize", "--model", model, "--scheme", "gptq-int4-g32", "--calibration-data", str(text),
            "--calibration-sequences", "3", "--calibration-length", "40"]
    assert cli.main([*argv, "--out", str(tmp_path / "q")]) == 0
    assert load_decoder(str(tmp_path / "q")).quantization == "gptq-int4-g32"
    assert "GPTQ: layer 2/2 quantized" in capsys.readouterr().err  # progress, per layer
    # The settings really arrive: a window longer than the text, and a missing file, are refused.
    assert cli.main([*argv[:-1], "4000", "--out", str(tmp_path / "long")]) == 2
    assert "fewer than GPTQConfig.sequence_length=4000" in capsys.readouterr().err
    argv[argv.index(str(text))] = str(tmp_path / "missing.txt")
    assert cli.main([*argv, "--out", str(tmp_path / "none")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "long").exists() and not (tmp_path / "none").exists()
