"""Chunked prefill: a prompt that arrives while rows decode is written into its row by the decode
steps themselves, a chunk at a time, and generates exactly what a prefill of its own gives."""

import threading

import numpy as np
import pytest

from compress.models import decode_step, decoder
from serve import engine as engine_lib
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests import compiles
from tests.tiny_decoder import tiny_decoder

SYSTEM = "You answer questions about the Python language reference, briefly and with care. " * 2
LONG = "word " * 150  # after the template, more than CHUNKED_MAX_TOKENS: a batched prefill even mid-decode


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def test_a_step_with_a_chunk_equals_a_decode_step_and_a_prefill(tiny):
    import jax.numpy as jnp

    config, params, _ = tiny
    rng = np.random.default_rng(0)
    rows, lengths, width = 4, [5, 9, 3, 7], 9
    tokens = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width), np.int32)
    for i, n in enumerate(lengths):  # left-padded prompts, as the engine's batched prefill writes them
        tokens[i, width - n :] = rng.integers(0, config.vocab_size, n)
        mask[i, width - n :] = 1
    cache = decoder.forward(params, jnp.asarray(tokens), config, attention_mask=jnp.asarray(mask),
                            cache=decoder.init_cache(config, rows, 64)).cache
    feed = jnp.asarray(rng.integers(0, config.vocab_size, rows), jnp.int32)
    plain = decoder.forward(params, feed[:, None], config, cache=cache, attend_len=32)
    np.testing.assert_array_equal(decode_step.forward_step(params, feed, cache, config, attend_len=32).logits,
                                  plain.logits[:, 0])
    # Row 2 emptied and filled with an 11-token prompt in chunks of 8 and 3 while rows 0, 1, 3 decode.
    prompt = rng.integers(0, config.vocab_size, 11).astype(np.int32)
    step = decode_step.forward_step(params, feed, cache, config, attend_len=32).cache
    step = step.replace(valid=step.valid.at[2].set(False), index=step.index.at[2].set(0),
                        lengths=step.lengths.at[2].set(0))
    first = decode_step.forward_step(params, feed, step, config, attend_len=32,
                                     chunk=decode_step.Chunk(jnp.asarray(prompt[:8]), jnp.int32(2), jnp.int32(8)))
    second = decode_step.forward_step(params, feed, first.cache, config, attend_len=32, chunk=decode_step.Chunk(
        jnp.asarray(np.pad(prompt[8:], (0, 5))), jnp.int32(2), jnp.int32(3)))
    alone = decoder.forward(params, jnp.asarray(prompt)[None], config).logits[0, -1]
    np.testing.assert_allclose(second.chunk_logits, alone, atol=1e-5)
    twice = decoder.forward(params, feed[:, None], config, cache=plain.cache, attend_len=32)
    twice = decoder.forward(params, feed[:, None], config, cache=twice.cache, attend_len=32)
    np.testing.assert_allclose(second.logits[np.array([0, 1, 3])], twice.logits[np.array([0, 1, 3]), 0], atol=1e-5)
    after = decode_step.forward_step(params, jnp.full(rows, 5, jnp.int32), second.cache, config, attend_len=32)
    whole = decoder.forward(params, jnp.asarray(np.append(prompt, 5))[None], config).logits[0, -1]
    np.testing.assert_allclose(after.logits[2], whole, atol=1e-5)


def _arrivals(engine, chats, sampling):
    """Token ids of `chats`, each submitted alone while a long request decodes (the first token
    of the long one seen before any is submitted)."""
    started = threading.Event()
    long = engine.submit(chats[0], SamplingParams(max_new_tokens=60, ignore_eos=True))
    threading.Thread(target=lambda: (next(long.deltas(), None), started.set()), daemon=True).start()
    assert started.wait(120)
    outs = [engine.submit(chat, sampling).result(120).token_ids for chat in chats[1:]]
    return [long.result(120).token_ids] + outs


@pytest.mark.parametrize("kv_cache, prefix_blocks", [(None, 0), (None, 64), ("int8", 64)])
def test_prompts_filled_in_chunks_generate_what_their_own_prefill_does(tiny, kv_cache, prefix_blocks):
    config, params, tokenizer = tiny
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in ("Write about the sea.", "What is a tuple?", "hi", "Is None a singleton?", LONG)]
    sampling = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=5)
    kwargs = dict(max_slots=4, max_seq_len=512, kv_cache=kv_cache, prefix_cache_blocks=prefix_blocks)
    with Engine(params, config, tokenizer, chunked_prefill=False, **kwargs) as plain:
        want = _arrivals(plain, chats, sampling)
        assert plain.stats["prefill_chunks"] == 0
    with Engine(params, config, tokenizer, **kwargs) as chunked:
        got = _arrivals(chunked, chats, sampling)
        # 3 short prompts in 2-3 chunks each (the prefix cache saves the system prompt's); the long one batched
        assert chunked.stats["prefill_chunks"] >= 3 and chunked.stats["prefills"] == 2
        if prefix_blocks:
            assert chunked.stats["prefix_tokens_reused"] > 0
    assert got == want


def test_warmup_covers_the_chunked_steps_and_a_cancelled_fill_frees_its_row(tiny):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=2, max_seq_len=128) as engine:
        engine.warmup(prompt_lengths=(16, 32))
        started = threading.Event()
        with compiles.counting() as events:
            long = engine.submit("a b c", SamplingParams(max_new_tokens=40, ignore_eos=True))
            threading.Thread(target=lambda: (next(long.deltas(), None), started.set()), daemon=True).start()
            assert started.wait(60)
            short = engine.submit("x " * (engine_lib.CHUNK + 5), SamplingParams(max_new_tokens=4))
            assert short.result(60).finish_reason == "length"
        assert engine.stats["prefill_chunks"] == 2
        # a full chunk, then the rest padded to the smallest chunk size that holds it
        n = len(short.result().prompt_token_ids)
        last = next(size for size in engine_lib.CHUNK_SIZES if size >= n - engine_lib.CHUNK)
        assert engine.stats["chunk_prompt_tokens"] == n and engine.stats["chunk_tokens"] == engine_lib.CHUNK + last
        # The row being filled (row 1, above the decoding one) is not computed as a row of the steps
        # that fill it: rows 1 and 2 are buckets, so every row computed was a decoding one.
        assert engine.stats["decode_rows"] == engine.stats["decode_rows_busy"]
        assert events == []  # the chunked steps and the row they fill were compiled by warmup
        gone = engine.submit("y " * (3 * engine_lib.CHUNK), SamplingParams(max_new_tokens=4))
        gone.cancel()
        assert gone.result(60).finish_reason == "cancelled"
        assert long.result(60).finish_reason == "length" and len(long.result().token_ids) == 40
        assert engine.running == 0 and not engine._filling


def test_warmup_for_one_request_compiles_only_the_widths_it_reaches(tiny):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=512) as engine:
        # one row: no chunked programs; slots up to 100: decode widths 64 and 128 of 64..512; one prefill
        assert engine.warmup(prompt_lengths=(len(engine.encode("a b c d e")),), max_len=100) == 2 + 1
        with compiles.counting() as events:
            out = engine.generate("a b c d e", SamplingParams(max_new_tokens=90, ignore_eos=True))[0]
        assert len(out.token_ids) == 90 and events == []


def test_rows_and_chunks_are_padded_to_the_smallest_bucket_that_holds_them():
    # Powers of two, and from 8 halfway between them; capped at max_slots, which is always a bucket.
    assert engine_lib.row_buckets(64) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64]
    assert engine_lib.row_buckets(20) == [1, 2, 4, 8, 12, 16, 20]
    assert engine_lib.row_buckets(3) == [1, 2, 3] and engine_lib.row_buckets(1) == [1]
    assert [engine_lib.row_bucket(n, 16) for n in (1, 3, 5, 8, 9, 12, 13, 16)] == [1, 4, 8, 8, 12, 12, 16, 16]
    # Every chunk but a prompt's last is CHUNK long, so each starts on a prefix-cache block boundary.
    assert engine_lib.CHUNK_SIZES[-1] == engine_lib.CHUNK and engine_lib.CHUNK % engine_lib.BLOCK == 0
    assert list(engine_lib.CHUNK_SIZES) == sorted(engine_lib.CHUNK_SIZES)


def test_nine_rows_decode_on_the_12_row_bucket_warmup_compiled_and_as_each_alone(tiny):
    config, params, tokenizer = tiny
    prompts = [f"question {i} about the language" for i in range(9)]
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    # max_seq_len under the smallest slot bucket (64): warmup compiled width 64 where steps ran 32
    with Engine(params, config, tokenizer, max_slots=16, max_seq_len=32) as engine:
        engine.warmup(prompt_lengths=(16,))
        with compiles.counting() as events:
            together = engine.generate(prompts, sampling)
        assert events == []  # the 12-row decode steps were compiled by warmup
        assert engine.stats["decode_rows"] == 12 * engine.stats["decode_steps"]  # 9 busy rows: the 12 bucket
        alone = [engine.generate(p, sampling)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def _churn(engine):
    """Token ids of requests that leave busy rows above freed ones: four prompted together (rows 0-3),
    two of them short; then, while the long ones decode, a prompt filled in chunks beside them."""
    sampling = [SamplingParams(max_new_tokens=n, temperature=0.8, top_k=20, seed=i, ignore_eos=True)
                for i, n in enumerate((2, 30, 3, 40))]
    first = engine.generate([f"question {i} about the language" for i in range(4)], sampling)
    started = threading.Event()
    short = engine.submit("a b c", SamplingParams(max_new_tokens=3, ignore_eos=True))
    long = engine.submit("d e f", SamplingParams(max_new_tokens=40, ignore_eos=True))
    threading.Thread(target=lambda: (next(long.deltas(), None), started.set()), daemon=True).start()
    assert started.wait(120)
    filled = engine.submit("g h " * 40, SamplingParams(max_new_tokens=5, ignore_eos=True))  # 3 chunks
    return [o.token_ids for o in first] + [r.result(120).token_ids for r in (short, long, filled)]


@pytest.mark.parametrize("kv_cache", [None, "int8"])  # int8: the scales move with their rows
def test_busy_rows_move_down_to_a_smaller_bucket_and_generate_what_they_would_have(tiny, kv_cache):
    config, params, tokenizer = tiny
    kwargs = dict(max_slots=4, max_seq_len=256, kv_cache=kv_cache)
    with Engine(params, config, tokenizer, compact_rows=False, **kwargs) as still:
        want = _churn(still)
        assert still.stats["rows_moved"] == 0
    with Engine(params, config, tokenizer, **kwargs) as moving:
        got = _churn(moving)
        # rows 1 and 3 left busy by rows 0 and 2: row 3 moves to 0, and both decode in 2 rows, not 4
        assert moving.stats["rows_moved"] >= 1
        assert moving.stats["decode_rows"] < still.stats["decode_rows"]
    assert got == want


@pytest.mark.parametrize("wait_steps", [50, 0])
def test_short_prompts_beyond_the_filling_rows_wait_for_a_chunk_turn(tiny, wait_steps):
    # MAX_FILLING + 1 short prompts at once while a row decodes: MAX_FILLING are filled in chunks at
    # once; the last waits a step or two for its turn instead of a batched prefill that stalls every row.
    config, params, tokenizer = tiny
    n = engine_lib.MAX_FILLING + 1
    prompts = [f"question {i}" for i in range(n)]
    with Engine(params, config, tokenizer, max_slots=n + 1, max_seq_len=128, prefix_cache_blocks=0,
                chunk_wait_steps=wait_steps) as engine:
        started = threading.Event()
        long = engine.submit("a b c", SamplingParams(max_new_tokens=40, ignore_eos=True))
        threading.Thread(target=lambda: (next(long.deltas(), None), started.set()), daemon=True).start()
        assert started.wait(60)
        short = engine.submit_many(prompts, [SamplingParams(max_new_tokens=3)] * n)
        got = [r.result(60).token_ids for r in short]
        assert engine.stats["prefills"] == (1 if wait_steps else 2)  # the long one's; without waiting, one more
        assert engine.stats["prefill_chunks"] == (n if wait_steps else n - 1)
    with Engine(params, config, tokenizer, max_slots=n + 1, max_seq_len=128, prefix_cache_blocks=0) as alone:
        assert got == [o.token_ids for o in alone.generate(prompts, SamplingParams(max_new_tokens=3))]
