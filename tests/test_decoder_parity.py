"""Our decoder's logits equal transformers' on tiny random Llama, Mistral and Qwen2 models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.models import decoder
from compress.pretrained import load_decoder
from tests.reference import hf_logits, tiny_hf_model

CASES = {
    "llama": dict(),
    "llama-biased-untied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "llama3-rope": dict(
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32),
        tie_word_embeddings=True,
    ),
    "llama-linear-rope": dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
    "llama-yarn-rope": dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)),
    "mistral-window": dict(sliding_window=5),
    "qwen2": dict(tie_word_embeddings=True),
}


def _arch(case):
    return case.split("-")[0].replace("llama3", "llama")


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    model = tiny_hf_model(_arch(request.param), **CASES[request.param])
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, load_decoder(str(path), with_tokenizer=False)


def test_logits_match_transformers(pair):
    model, ours = pair
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 24))
    expected = hf_logits(model, tokens)
    got = decoder.forward(ours.params, jnp.asarray(tokens), ours.config).logits
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_transformers(pair):
    model, ours = pair
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 97, size=(3, 16))
    mask = np.ones_like(tokens)
    mask[1, :5] = 0
    mask[2, :11] = 0
    expected = hf_logits(model, tokens, mask)
    got = np.asarray(decoder.forward(ours.params, jnp.asarray(tokens), ours.config, attention_mask=jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)


def test_kv_cache_decode_equals_full_forward(pair):
    """Prefill a left-padded prompt, then decode token by token: same logits as one full pass."""
    _, ours = pair
    c = ours.config
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 97, size=(2, 14))
    mask = np.ones_like(tokens)
    mask[0, :4] = 0
    full = np.asarray(decoder.forward(ours.params, jnp.asarray(tokens), c, attention_mask=jnp.asarray(mask)).logits)
    step = jax.jit(lambda p, t, m, cache: decoder.forward(p, t, c, attention_mask=m, cache=cache))
    cache = decoder.init_cache(c, batch=2, max_len=32)
    out = step(ours.params, jnp.asarray(tokens[:, :8]), jnp.asarray(mask[:, :8]), cache)
    pieces = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(8, 14):
        out = step(ours.params, jnp.asarray(tokens[:, t : t + 1]), jnp.ones((2, 1), jnp.int32), cache)
        pieces.append(np.asarray(out.logits))
        cache = out.cache
    got = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.lengths), mask.sum(1))
