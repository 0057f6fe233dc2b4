"""The serving engine on the real SmolLM2: greedy parity with transformers, batching, sampling, buckets."""

import os

import pytest

from serve import engine as engine_lib
from serve.engine import Engine
from serve.sampling import SamplingParams

from tests import compiles
from tests.reference import PROMPTS, run_concurrently

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(max_new_tokens=32, temperature=0.0)


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=4, max_seq_len=256) as e:
        yield e


@pytest.fixture(scope="module")
def reference(engine):
    import torch
    from transformers import AutoModelForCausalLM

    from compress.formats.registry import resolve

    path = resolve("smollm2-135m-instruct").path
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


def _hf_greedy(reference, tokenizer, prompts, max_new_tokens):
    """transformers' batched greedy generate with left padding, EOS and padding cut off."""
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = reference.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    eos = reference.generation_config.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        stops = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: stops[0]] if stops else row)
    return rows


def test_greedy_equals_transformers_batched_generate_with_left_padding(engine, reference):
    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}], add_generation_prompt=True, tokenize=False
    )
    prompts = [*PROMPTS, chat]
    expected = _hf_greedy(reference, engine.tokenizer, prompts, 32)
    batched = engine.generate(prompts, GREEDY)
    for prompt, want, got in zip(prompts, expected, batched):
        assert got.token_ids == want, (prompt, engine.tokenizer.decode(got.token_ids), engine.tokenizer.decode(want))
    # Unbatched: one prompt at a time gives the same tokens.
    for prompt, got in zip(prompts[:2], batched):
        assert engine.generate(prompt, GREEDY)[0].token_ids == got.token_ids


def test_chat_messages_stop_at_end_of_turn(engine):
    out = engine.generate([[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_new_tokens=64))[0]
    assert out.finish_reason == "stop" and "Paris" in out.text
    assert out.time_to_first_token <= out.total_seconds


def test_stream_yields_the_final_text(engine):
    request = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20))
    deltas = list(request.deltas())
    assert len(deltas) > 1 and "".join(deltas) == request.result().text


def test_stop_strings_end_the_text_before_the_match(engine):
    full = engine.generate(PROMPTS[1], GREEDY)[0].text
    stop = full.split()[6]  # a word from the middle of the greedy text
    assert full.index(stop) > 0
    out = engine.generate(PROMPTS[1], SamplingParams(max_new_tokens=32, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.index(stop)]
    assert "".join(engine.stream(PROMPTS[1], SamplingParams(max_new_tokens=32, stop=(stop,)))) == out.text


def test_held_back_is_the_longest_end_of_the_text_a_stop_starts_with():
    import random

    from serve.engine import held_back

    def every_length(text, stop):  # the loop it replaced
        return next((k for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])), 0)

    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 9)))
        stop = "".join(rng.choice("abc") for _ in range(rng.randint(1, 9)))
        assert held_back(text, stop) == every_length(text, stop), (text, stop)
    assert held_back("the end is ne", "near") == 2 and held_back("near", "near") == 0


def test_stop_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(ValueError, match=r"stop_token_ids must be in \[0, 49152\)"):
        engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=2, stop_token_ids=(3, 10**20)))


def test_seeded_sampling_repeats_whatever_the_batch_mates(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone = engine.generate(PROMPTS[0], params)[0]
    crowded = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]], [GREEDY, params, SamplingParams(temperature=1.2, seed=5)])
    assert crowded[1].token_ids == alone.token_ids
    other = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=99))[0]
    assert other.token_ids != alone.token_ids


def test_one_bad_request_fails_alone(engine):
    too_long = "word " * 400  # more than the 256-token context
    outs = engine.generate([PROMPTS[0], too_long, PROMPTS[2]], SamplingParams(max_new_tokens=8))
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert "context" in outs[1].error


def test_short_requests_are_not_held_hostage_by_a_long_one(engine):
    long = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=160, ignore_eos=True))
    shorts = [engine.submit(p, SamplingParams(max_new_tokens=4, ignore_eos=True)) for p in PROMPTS * 2]
    finished = [s.result(timeout=120) for s in shorts]
    assert not long.done, "the 8 short requests through 3 free rows should finish while the long one runs"
    assert all(o.finish_reason == "length" and len(o.token_ids) == 4 for o in finished)
    assert len(long.result(timeout=300).token_ids) == 160


def test_new_prompt_lengths_in_a_bucket_do_not_recompile(engine):
    engine.generate(["a b c d e"], SamplingParams(max_new_tokens=3))  # compile the 16-token bucket
    prefill, decode = engine._prefill_insert._cache_size(), engine._decode._cache_size()
    for text in ["Hi", "a b c d e f g h i j", "one two three"]:
        engine.generate([text], SamplingParams(max_new_tokens=3))
    assert engine._prefill_insert._cache_size() == prefill
    assert engine._decode._cache_size() == decode


def test_concurrent_submitters(engine):
    results, errors = run_concurrently(
        lambda i: engine.submit(PROMPTS[i % 4], SamplingParams(max_new_tokens=6)).result(timeout=120), 12
    )
    assert not errors and len(results) == 12
    for i, out in results.items():
        assert out.token_ids == results[i % 4].token_ids  # greedy: same prompt, same tokens


def test_sharded_engine_generates_like_one_device(engine):
    from compress import sharding as shd

    mesh = shd.make_mesh(2, 2, 2)
    params = SamplingParams(max_new_tokens=12)
    with Engine.from_pretrained("smollm2-135m-instruct", mesh=mesh, max_slots=4, max_seq_len=128) as sharded:
        assert sharded._cache.k.sharding.spec[1] == ("data", "fsdp")  # rows split over data x fsdp
        assert "spec" not in sharded.params["layers"]["q"]  # a mesh keeps XLA's matmuls, no float kernel
        got = sharded.generate(PROMPTS, params)
    want = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_cancel_frees_the_row(engine):
    request = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=200, ignore_eos=True))
    next(request.deltas())  # it is running
    request.cancel()
    out = request.result(timeout=60)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 200
    assert engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=4))[0].finish_reason == "length"


def test_incremental_text_equals_a_full_decode(engine):
    for prompt in [PROMPTS[1], [{"role": "user", "content": "Écris une phrase en français avec des accents, et un emoji 🌊."}]]:
        out = engine.generate([prompt], SamplingParams(max_new_tokens=40))[0]
        assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_a_second_process_reuses_compiled_programs(tmp_path):
    import json
    import subprocess
    import sys

    code = """
import json, jax
hits = []
jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if 'cache_hits' in name else None)
from serve.engine import Engine
from serve.sampling import SamplingParams
with Engine.from_pretrained('smollm2-135m-instruct', max_slots=1, max_seq_len=64) as e:
    out = e.generate('Hello', SamplingParams(max_new_tokens=3))[0]
print(json.dumps({'hits': len(hits), 'tokens': out.token_ids}))
"""
    from compress.kernels import cpu

    env = {**os.environ, "PRESS_CACHE_DIR": str(tmp_path)}  # an empty compilation cache
    if cpu.library_path():  # this process's kernels, not a build of them in the new cache
        env["PRESS_CPU_KERNELS_LIB"] = cpu.library_path()
    env.pop("XLA_FLAGS", None)  # one device, like a serving process

    def run():
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert os.listdir(tmp_path / "jax-compilation")
    assert first["hits"] == 0 and second["hits"] >= 2  # prefill and decode came from the cache
    assert first["tokens"] == second["tokens"]


def test_warmup_compiles_every_shape_traffic_meets():
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=3, max_seq_len=128) as e:
        # rows 1,2,3 x slots 64,128, each without and with a prompt's chunk of each size; 3 prefills;
        # the row move (compact_rows); an empty row to fill
        assert e.warmup(prompt_lengths=(16,)) == 3 * 2 * (1 + len(engine_lib.CHUNK_SIZES)) + 3 + 1 + 1
        with compiles.counting() as events:
            outs = e.generate(["a", "b c", "d e f"], SamplingParams(max_new_tokens=80, ignore_eos=True))
        assert all(len(o.token_ids) == 80 for o in outs)
        assert events == []  # nothing traced or compiled mid-traffic
