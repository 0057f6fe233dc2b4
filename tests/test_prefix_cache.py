"""Prefix caching: prompts that share a prefix reuse its KV and generate exactly what a full prefill gives."""

import jax
import pytest

from compress import sharding as shd
from serve import prefix_cache
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.tiny_decoder import tiny_decoder

SYSTEM = "You answer questions about the Python language reference, briefly and with care. " * 3
QUESTIONS = ["What is a tuple?", "What does nonlocal do?", "Explain list comprehensions.", "hi", "Is None a singleton?"]


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def _chats():
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]


@pytest.mark.parametrize("kv_cache", [None, "int8"])
def test_reused_prefixes_generate_what_a_full_prefill_does(tiny, kv_cache):
    config, params, tokenizer = tiny
    sampling = [SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)]
    kwargs = dict(max_slots=4, max_seq_len=512, kv_cache=kv_cache)
    with Engine(params, config, tokenizer, prefix_cache_blocks=0, **kwargs) as plain:
        want = [[plain.generate(c, s)[0].token_ids for c in _chats()] for s in sampling]
        assert plain.stats["prefix_tokens_reused"] == 0
    with Engine(params, config, tokenizer, prefix_cache_blocks=256, **kwargs) as cached:
        one_by_one = [[cached.generate(c, s)[0].token_ids for c in _chats()] for s in sampling]
        together = [[o.token_ids for o in cached.generate(_chats(), s)] for s in sampling]  # two prefill groups
        reused = cached.stats["prefix_tokens_reused"]
    assert one_by_one == want and together == want
    # All but the very first prompt found the system prompt's blocks.
    assert reused >= (2 * len(QUESTIONS) * 2 - 1) * prefix_cache.BLOCK


def test_a_data_parallel_engine_reuses_prefixes_on_every_device(tiny):
    config, params, tokenizer = tiny
    mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1)  # the 8 simulated devices
    with Engine(params, config, tokenizer, max_slots=8, max_seq_len=512, prefix_cache_blocks=0) as plain:
        want = [o.token_ids for o in plain.generate(_chats(), SamplingParams(max_new_tokens=8))]
    with Engine(params, config, tokenizer, max_slots=8, max_seq_len=512, mesh=mesh, prefix_cache_blocks=256) as cached:
        cached.generate(_chats()[0], SamplingParams(max_new_tokens=2))  # the system prompt's blocks
        got = [o.token_ids for o in cached.generate(_chats(), SamplingParams(max_new_tokens=8))]
        assert cached.stats["prefix_tokens_reused"] > 0
    assert got == want


def test_blocks_are_keyed_by_their_whole_prefix_and_evicted_least_recently_used():
    a = list(range(100))
    b = list(range(40)) + [7] * 60
    ka, kb = prefix_cache.block_keys(a), prefix_cache.block_keys(b)
    assert len(ka) == 100 // prefix_cache.BLOCK and ka[:2] == kb[:2] and ka[2] != kb[2]
    assert prefix_cache.block_keys(a[16:32]) != ka[1:2]  # the same tokens after another prefix: another key
    cache = prefix_cache.PrefixCache(max_blocks=3)
    assert [cache.allocate(key) for key in ka[:3]] == [0, 1, 2]
    assert cache.allocate(ka[0]) is None  # cached already
    assert cache.cached_blocks(ka) == 3
    cache.cached_blocks(ka[:1])  # the first is used again...
    assert cache.allocate(kb[2]) == 1  # ...so the second's block goes
    assert len(cache) == 3 and ka[0] in cache and ka[1] not in cache and cache.cached_blocks(ka) == 1
    assert cache.block_ids([ka[0], kb[2]]) == [0, 1]
    # A pinned block (read by a prefill being planned) is never handed out; with all pinned, none is.
    assert cache.allocate(b"other", pinned={0, 1}) == 2 and ka[2] not in cache
    assert cache.allocate(b"more", pinned={0, 1, 2}) is None
    cache.discard([b"other"])  # its prefill failed: the block is free again, the key forgotten
    assert b"other" not in cache and cache.allocate(b"more") == 2


def test_the_pool_gathers_and_scatters_blocks_by_index():
    import numpy as np

    pool = prefix_cache.new_pool(2, 4, 1, 2, jax.numpy.float32, quantized=False)
    rows = jax.numpy.arange(2 * 40 * 2, dtype=jax.numpy.float32).reshape(1, 2, 40, 1, 2)  # [L=1, n=2, W=40, K, H]
    fresh = prefix_cache.KVCache(k=jax.numpy.concatenate([rows, -rows]), v=jax.numpy.concatenate([rows, rows]),
                                 valid=None, index=None, lengths=None)
    # row 0: blocks at slots 3.. and 19.. go to pool blocks 2 and 0; row 1: one block at slot 8.. to 3, one dropped
    ids = np.array([[2, 0], [3, 4]], np.int32)
    pool = prefix_cache.scatter(pool, fresh, ids, np.array([3, 8], np.int32))
    np.testing.assert_array_equal(pool.k[:, 2], fresh.k[:, 0, 3:19])
    np.testing.assert_array_equal(pool.k[:, 0], fresh.k[:, 0, 19:35])
    np.testing.assert_array_equal(pool.v[:, 3], fresh.v[:, 1, 8:24])
    assert not np.asarray(pool.k[:, 1]).any()  # untouched
    got = prefix_cache.gather(pool, np.array([[2, 0], [3, 3]], np.int32))
    np.testing.assert_array_equal(got.k[:, 0], fresh.k[:, 0, 3:35])
    np.testing.assert_array_equal(got.v[:, 1, 16:], fresh.v[:, 1, 8:24])
    assert got.k.shape == (2, 2, 32, 1, 2) and got.k_scale is None


@pytest.mark.parametrize("cached, prompt_len, reused", [
    (0, 100, 0), (5, 16, 0), (5, 17, 1), (5, 200, 4), (3, 200, 3), (7, 200, 6), (13, 1000, 12), (40, 1000, 32),
])
def test_reused_blocks_leave_a_token_to_prefill_and_few_lengths(cached, prompt_len, reused):
    assert prefix_cache.reusable_blocks(cached, prompt_len) == reused


def test_warmup_compiles_the_prefills_after_the_chat_templates_prefix(tiny):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=2, max_seq_len=256, prefix_cache_blocks=64) as engine:
        [prefix] = engine.chat_prefix_lengths()  # SmolLM2's template: a default system prompt
        assert prefix % prefix_cache.BLOCK == 0 and prefix >= prefix_cache.BLOCK
        engine.warmup(prompt_lengths=(16, 32), prefix_lengths=(prefix,))
        compiled = engine._prefix_prefill_insert._cache_size()
        chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
        engine.generate(chats[0], SamplingParams(max_new_tokens=2))  # caches the template's blocks
        engine.generate(chats[1:], SamplingParams(max_new_tokens=2))
        assert engine.stats["prefix_tokens_reused"] >= prefix * (len(chats) - 1)
        assert engine._prefix_prefill_insert._cache_size() == compiled  # nothing compiled mid-traffic
    with Engine(params, config, tokenizer, max_slots=2, max_seq_len=256, prefix_cache_blocks=0) as off:
        assert off.chat_prefix_lengths() == ()
