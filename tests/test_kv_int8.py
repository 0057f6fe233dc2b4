"""The int8 key/value cache: per-token, per-head scales, half the bytes, decoding close to float."""

import jax
import jax.numpy as jnp
import numpy as np

from compress.models import attention as attn
from compress.models import decoder

CONFIG = decoder.DecoderConfig(vocab_size=128, embed_dim=64, mlp_dim=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16)


def test_quantize_heads_round_trip_within_half_a_step():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, 16)) * jnp.linspace(0.01, 10, 4)[:, None]
    q, scale = attn.quantize_heads(x)
    assert q.dtype == jnp.int8 and scale.shape == (2, 5, 4)
    err = jnp.abs(q.astype(jnp.float32) * scale[..., None] - x)
    assert bool(jnp.all(err <= scale[..., None] / 2 + 1e-7))


def test_int8_cache_is_about_half_a_bfloat16_cache():
    float_cache = decoder.init_cache(CONFIG, 4, 64, jnp.bfloat16)
    int8_cache = decoder.init_cache(CONFIG, 4, 64, quantized=True)
    assert int8_cache.k.dtype == jnp.int8 and int8_cache.k_scale.shape == (2, 4, 64, 4)
    assert int8_cache.nbytes / float_cache.nbytes == (16 + 4) / 32  # head_dim 16: int8 + one float32 scale


def _decode(params, cache, prompt, steps):
    out = decoder.forward(params, prompt, CONFIG, cache=cache)
    logits, tokens, cache = [out.logits[:, -1]], [], out.cache
    for _ in range(steps):
        nxt = logits[-1].argmax(-1)[:, None]
        tokens.append(nxt)
        out = decoder.forward(params, nxt, CONFIG, cache=cache)
        logits.append(out.logits[:, -1])
        cache = out.cache
    return jnp.stack(logits, 1), jnp.concatenate(tokens, 1)


def test_decoding_with_an_int8_cache_stays_close_to_float():
    params = decoder.init_params(CONFIG, jax.random.key(0), scale=0.2)
    prompt = jax.random.randint(jax.random.key(1), (3, 10), 0, CONFIG.vocab_size)
    want_logits, want_tokens = _decode(params, decoder.init_cache(CONFIG, 3, 32), prompt, 12)
    got_logits, got_tokens = _decode(params, decoder.init_cache(CONFIG, 3, 32, quantized=True), prompt, 12)
    # first logits: prefill attends over the int8-stored keys/values of the prompt
    rel = float(jnp.abs(got_logits - want_logits).mean() / jnp.abs(want_logits).mean())
    assert 0 < rel < 0.02, rel
    assert float(jnp.mean(got_tokens == want_tokens)) >= 0.9
    np.testing.assert_array_equal(np.asarray(got_tokens[:, :4]), np.asarray(want_tokens[:, :4]))
