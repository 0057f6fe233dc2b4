"""The native decode-attention kernel (compress/kernels/cpu.cc): attention over the KV cache read
in place equals a float64 reference and the plain path's, for float32 and int8 caches, any rows,
layer, query count and head grouping; the compiled decode step calls it without copying the cache;
a cache on a mesh keeps the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.kernels import cpu
from compress.models import attention as attn
from compress.models import decode_step, decoder
from tests.tiny_decoder import tiny_decoder


def _reference(q, keys, values, k_scale, v_scale, allowed, layer, first_row):
    """float64 softmax attention of q [B, T, N, H] (unscaled) over cache rows first_row.. of `layer`."""
    b, t, n, h = q.shape
    w = allowed.shape[-1]
    k = np.asarray(keys[layer, first_row : first_row + b, :w], np.float64)  # [B, W, K, H]
    v = np.asarray(values[layer, first_row : first_row + b, :w], np.float64)
    if k_scale is not None:
        k = k * np.asarray(k_scale[layer, first_row : first_row + b, :w], np.float64)[..., None]
        v = v * np.asarray(v_scale[layer, first_row : first_row + b, :w], np.float64)[..., None]
    groups = n // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # [B, W, N, H]
    scores = np.einsum("btnh,bwnh->bntw", np.asarray(q, np.float64), k) / np.sqrt(h)
    mask = np.asarray(allowed)[:, None]  # [B, 1, T, W]
    scores = np.where(mask, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    probs = np.where(mask, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
    total = probs.sum(-1, keepdims=True)
    probs = np.where(total > 0, probs / np.where(total > 0, total, 1), 1 / w)  # nothing allowed: the mean
    return np.einsum("bntw,bwnh->btnh", probs, v)


def _cache(rng, shape, quantized):
    k, v = (jnp.asarray(rng.standard_normal(shape) * 2, jnp.float32) for _ in range(2))
    if not quantized:
        return k, v, None, None
    (k, ks), (v, vs) = attn.quantize_heads(k), attn.quantize_heads(v)
    return k, v, ks, vs


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("b, t, w, heads, kv_heads, h", [
    (1, 1, 512, 9, 3, 64),   # SmolLM2's grouping, batch-1 decoding at a long context (slots split)
    (5, 1, 37, 4, 2, 16),    # odd width, several rows
    (2, 5, 64, 8, 1, 32),    # a verify pass of 5 tokens, 8 query heads per key head
    (1, 32, 100, 16, 4, 128),  # a prefill chunk
    (2, 3, 70, 6, 2, 80),    # head sizes of 5 and 6 AVX-512 vectors (10 and 12 on AVX2)
    (1, 2, 90, 4, 4, 96),
    (3, 2, 48, 6, 3, 48),    # a head size the vector code has no case for: the portable loops
])
def test_the_kernel_equals_float64(quantized, b, t, w, heads, kv_heads, h):
    rng = np.random.default_rng(b * 100 + t + h)
    layers, rows, slots, first_row, layer = 3, b + 2, w + 7, 1, 2
    keys, values, ks, vs = _cache(rng, (layers, rows, slots, kv_heads, h), quantized)
    q = jnp.asarray(rng.standard_normal((b, t, heads, h)), jnp.float32)
    allowed = jnp.asarray(rng.random((b, t, w)) < 0.6).at[0, 0].set(False)  # query (0, 0) sees no slot
    assert cpu.attention_usable(q, keys)
    got = jax.jit(lambda q, a: attn.cached_attention(q, keys, ks, values, vs, layer, a, jnp.float32, first_row))(
        q, allowed)
    want = _reference(q, keys, values, ks, vs, allowed, layer, first_row)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    plain = attn.cached_attention(q, keys, ks, values, vs, layer, allowed, jnp.float32, first_row, native=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=2e-5, atol=2e-5)


def test_what_the_kernel_does_not_take_stays_on_the_plain_path():
    keys = jnp.zeros((1, 1, 8, 1, 16), jnp.bfloat16)  # one key/value head
    assert not cpu.attention_usable(jnp.zeros((1, 1, 2, 16), jnp.float32), keys)  # a bfloat16 cache
    f32 = keys.astype(jnp.float32)
    assert not cpu.attention_usable(jnp.zeros((1, 1, 2, 12), jnp.float32), f32)  # H not a multiple of 16
    assert not cpu.attention_usable(jnp.zeros((1, 65, 2, 16), jnp.float32), f32)  # a long prefill
    assert not cpu.attention_usable(jnp.zeros((1, 1, 17, 16), jnp.float32), f32)  # 17 heads per key head
    assert cpu.attention_usable(jnp.zeros((1, 64, 16, 16), jnp.float32), f32)


@pytest.fixture(scope="module")
def tiny():
    config, params, _ = tiny_decoder(num_heads=6, num_kv_heads=2, head_dim=16)
    return config, params


@pytest.mark.parametrize("quantized", [False, True])
def test_decode_steps_with_a_chunk_match_the_plain_path(tiny, quantized):
    """A serving step (3 decoding rows and a 7-token chunk filling row 1) and a prefill, natively
    and on the plain path (a cache with native=False): the same logits and the same cache."""
    config, params = tiny
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(0, config.vocab_size, (3, 9)), jnp.int32)
    chunk = decode_step.Chunk(jnp.asarray(rng.integers(0, config.vocab_size, 8), jnp.int32), jnp.int32(1),
                              jnp.int32(7))

    def run(native):
        cache = decoder.init_cache(config, 3, 48, quantized=quantized).replace(native=native)
        out = jax.jit(lambda c: decoder.forward(params, prompt, config, cache=c, attend_len=48))(cache)
        step = jax.jit(lambda c: decode_step.forward_step(params, prompt[:, -1], c, config, attend_len=32, chunk=chunk))
        return out.logits, step(out.cache)

    (prefill_n, step_n), (prefill_p, step_p) = run(True), run(False)
    np.testing.assert_allclose(prefill_n, prefill_p, atol=1e-4)
    np.testing.assert_allclose(step_n.logits, step_p.logits, atol=1e-4)
    np.testing.assert_allclose(step_n.chunk_logits, step_p.chunk_logits, atol=1e-4)
    for a, b in zip(jax.tree.leaves(step_n.cache), jax.tree.leaves(step_p.cache)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_compiled_step_reads_the_cache_in_place(tiny):
    """One attention call per layer, on the whole carried cache: no slice or copy of the cache."""
    config, params = tiny
    cache = decoder.init_cache(config, 2, 64)
    step = jax.jit(lambda p, t, c: decode_step.forward_step(p, t, c, config, attend_len=64), donate_argnums=2)
    hlo = step.lower(params, jnp.zeros((2,), jnp.int32), cache).compile().as_text()
    shape = "f32[" + ",".join(map(str, cache.k.shape)) + "]"
    calls = [line for line in hlo.splitlines() if "press_attention_f32" in line and "custom-call(" in line]
    assert len(calls) == 1  # in the scan body, run once per layer
    # (the step's write of the new keys and values, a dynamic-update-slice in place, is not a copy)
    copies = [line for line in hlo.splitlines()
              if f"= {shape}" in line and any(op in line for op in (" copy(", " slice(", " dynamic-slice("))]
    assert copies == []
    plain = step.lower(params, jnp.zeros((2,), jnp.int32), cache.replace(native=False)).compile().as_text()
    assert "press_attention" not in plain


def test_an_engine_on_a_mesh_keeps_its_cache_on_the_plain_path():
    """(tests/test_engine.py checks that a sharded engine generates what a single-device one does.)"""
    from compress import sharding as shd
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    config, params, tokenizer = tiny_decoder()
    with Engine(params, config, tokenizer, mesh=shd.make_mesh(data=-1, fsdp=1, tensor=1), max_slots=2,
                max_seq_len=32) as on_mesh, Engine(params, config, tokenizer, max_slots=2, max_seq_len=32) as alone:
        assert not on_mesh._cache.native and alone._cache.native
        # The greedy argmax follows the cache: native alone, XLA's reductions on the mesh.
        z = np.zeros(2, np.int32)
        for engine, native in ((on_mesh, False), (alone, True)):
            hlo = engine._decode.lower(engine.params, engine._cache, engine._pool, z, np.zeros(2, np.uint32), z,
                                       np.zeros(2, np.float32), z, np.ones(2, np.float32), 2, 32, None,
                                       None).compile().as_text()
            assert ("press_argmax" in hlo) == (native and cpu.available())
        tokens = [e.generate(["The quick brown fox"], SamplingParams(max_new_tokens=6))[0].token_ids
                  for e in (on_mesh, alone)]
        assert tokens[0] == tokens[1]
