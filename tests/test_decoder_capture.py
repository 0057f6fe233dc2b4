"""What a forward pass captures from inside its layers (decoder.Capture): hidden states and attention
probabilities equal transformers' output_hidden_states / output_attentions and a layer-by-layer walk
through the decoder's own hook (embed, layer_tables, decoder_layer), and capturing changes nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from compress.formats import hf_decoder
from compress.models import decoder

CONFIG = decoder.DecoderConfig(vocab_size=97, embed_dim=64, mlp_dim=96, num_layers=3, num_heads=4, num_kv_heads=2,
                               head_dim=16, rms_norm_eps=1e-6)


def _params(seed=0):
    return decoder.init_params(CONFIG, jax.random.key(seed), scale=0.1)


def test_captured_hidden_states_and_attention_equal_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    params = _params()
    hf_decoder.export(params, CONFIG, str(tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 10))
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(tokens), output_hidden_states=True, output_attentions=True)
    ours = decoder.forward(params, jnp.asarray(tokens), CONFIG, return_hidden=True,
                           capture=decoder.Capture(hidden=(0, 2, 3), attention=(0, 2)))
    # transformers' last hidden state is after the final norm; ours are the residual stream
    want_hidden = [out.hidden_states[i].numpy() for i in (0, 2)]
    np.testing.assert_allclose(np.asarray(ours.captured["hidden"][:2]), np.stack(want_hidden), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours.hidden_states[:3]), np.stack([h.numpy() for h in out.hidden_states[:3]]),
                               atol=1e-5)
    final = decoder.rms_norm(ours.captured["hidden"][2], params["final_norm"], CONFIG.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(final), out.hidden_states[3].numpy(), atol=1e-5)
    want_attention = np.stack([out.attentions[i].numpy() for i in (0, 2)])  # [2, B, N, T, T]
    np.testing.assert_allclose(np.asarray(ours.captured["attention"]), want_attention, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours.logits), out.logits.numpy(), atol=1e-4)


def test_capture_equals_a_layer_by_layer_walk_of_packed_rows():
    params = _params(1)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, size=(2, 12)))
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
    mask = jnp.ones((2, 12), bool)
    tables = decoder.layer_tables(CONFIG, mask, segment_ids=segment_ids)
    x = decoder.embed(params, tokens, CONFIG)
    hidden, probs = [x], []
    for layer in range(CONFIG.num_layers):
        p = jax.tree.map(lambda a: a[layer], params["layers"])
        seen = {}

        def attend(q, k, v):
            y, seen["probs"] = decoder.attn.attention_with_probs(q, k, v, tables.allowed)
            return y

        x, _ = decoder.decoder_layer(p, x, CONFIG, tables.cos, tables.sin, attend)
        hidden.append(x)
        probs.append(seen["probs"])
    out = decoder.forward(params, tokens, CONFIG, segment_ids=segment_ids,
                          capture=decoder.Capture(hidden=(0, 1, 2, 3), attention=(1,)))
    np.testing.assert_allclose(np.asarray(out.captured["hidden"]), np.stack(hidden), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.captured["attention"][0]), np.asarray(probs[1]), atol=1e-5)
    # a token's probabilities stay inside its document; padding is attended by nothing
    assert float(out.captured["attention"][0, 0, :, 6, :5].sum()) == 0.0
    assert float(out.captured["attention"][0, 1, :, :9, 9:].sum()) == 0.0
    np.testing.assert_allclose(np.asarray(decoder.lm_head(params, x, CONFIG)), np.asarray(out.logits), atol=1e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_capturing_changes_neither_the_logits_nor_their_gradient(remat):
    params = _params(2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 97, size=(2, 8)))

    def loss(params, capture):
        out = decoder.forward(params, tokens, CONFIG, remat=remat, capture=capture)
        extra = 0.0 if capture is None else 0.0 * sum(jnp.sum(v) for v in out.captured.values())
        return jnp.mean(out.logits**2) + extra

    plain, plain_grad = jax.value_and_grad(loss)(params, None)
    captured, captured_grad = jax.value_and_grad(loss)(params, decoder.Capture(hidden=(1,), attention=(0, 2)))
    assert float(captured) == pytest.approx(float(plain), rel=1e-6)
    for a, b in zip(jax.tree.leaves(plain_grad), jax.tree.leaves(captured_grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_a_loss_on_captured_attention_has_the_gradient_of_one_on_the_walk():
    params = _params(3)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 97, size=(1, 6)))

    def via_capture(params):
        return jnp.sum(decoder.forward(params, tokens, CONFIG, capture=decoder.Capture(attention=(1,))).captured["attention"] ** 2)

    def via_walk(params):
        tables = decoder.layer_tables(CONFIG, jnp.ones((1, 6), bool))
        x = decoder.embed(params, tokens, CONFIG)
        p0, p1 = (jax.tree.map(lambda a: a[i], params["layers"]) for i in (0, 1))
        x, _ = decoder.decoder_layer(p0, x, CONFIG, tables.cos, tables.sin, tables.attend)
        seen = {}

        def attend(q, k, v):
            y, seen["probs"] = decoder.attn.attention_with_probs(q, k, v, tables.allowed)
            return y

        decoder.decoder_layer(p1, x, CONFIG, tables.cos, tables.sin, attend)
        return jnp.sum(seen["probs"] ** 2)

    a, b = jax.grad(via_capture)(params), jax.grad(via_walk)(params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_bad_captures_are_refused():
    params = _params()
    tokens = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="capture.hidden"):
        decoder.forward(params, tokens, CONFIG, capture=decoder.Capture(hidden=(4,)))
    with pytest.raises(ValueError, match="capture.attention"):
        decoder.forward(params, tokens, CONFIG, capture=decoder.Capture(attention=(2, 1)))
