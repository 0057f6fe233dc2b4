"""Speculative decoding with a lookup draft (draft="ngram"): each row proposes what followed its
last tokens earlier in its own context, and the target checks the proposal in one pass. Greedy
output is the target's own; sampled output has the target's distribution."""

import io
import json

import jax
import numpy as np
import pytest

from compress.models import decoder
from serve import cli, speculative
from serve import engine as engine_lib
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests import compiles
from tests.test_speculative import _enumerated, assert_sampled_as
from tests.tiny_decoder import tiny_decoder

# Prompts that repeat themselves (a lookup finds proposals) and one that does not.
PROMPTS = ["one two three four five six one two three four five six one two three",
           "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):\n    return",
           "The quick brown fox jumps over the lazy dog. " * 3, "Hi"]
LENGTHS = (30, 24, 17, 9)


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


def _generate(engine, prompts=PROMPTS, lengths=LENGTHS, **sampling):
    return [o.token_ids for o in engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling)
                                                           for n in lengths])]


@pytest.mark.parametrize("context, k, min_ngram, want", [
    ([1, 2, 3, 4, 5, 1, 2, 3], 3, 2, [4, 5, 1]),  # the 3-gram (1, 2, 3) came before: what followed it
    ([1, 2, 3, 4, 5, 9, 2, 3], 3, 2, [4, 5, 9]),  # no 3-gram; the 2-gram (2, 3)
    ([1, 2, 3, 4, 5, 9, 7, 3], 3, 2, []),  # only a 1-gram recurs: not enough by default
    ([4, 1, 8, 1, 9, 1], 2, 1, [9, 1]),  # the 1-gram (1) three times: the latest with 2 tokens after it
    ([4, 1, 8, 1, 9, 1], 4, 1, [8, 1, 9, 1]),  # none has 4 after it: the earliest, which has the most
    ([1, 2, 3, 4], 2, 1, []),  # nothing recurs
    ([5], 2, 1, []),
])
def test_lookup_proposes_what_followed_the_last_tokens_before(context, k, min_ngram, want):
    assert speculative.lookup(context, k, min_ngram=min_ngram) == want
    assert speculative.LOOKUP_MIN_NGRAM == 2


def _scan(context, k, max_ngram, min_ngram):
    """Prompt lookup as a scan of the whole context (numpy): the reference for speculative.Ngrams."""
    seq = np.asarray(context, np.int64)
    for n in range(min(max_ngram, len(seq) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # every n-gram before the last one's start
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= len(seq)]
            at = (full[-1] if full.size else hits[0]) + n
            return seq[at : at + k].tolist()
    return []


@pytest.mark.parametrize("vocab", [2, 3, 8])
def test_ngrams_propose_as_a_scan_of_the_whole_context_would(vocab):
    # Grown a token at a time (as a request's context grows), at every length and k.
    rng = np.random.default_rng(vocab)
    for max_ngram, min_ngram in ((3, 2), (3, 1), (4, 2)):
        for _ in range(20):
            context = rng.integers(0, vocab, 40).tolist()
            ngrams = speculative.Ngrams(max_ngram, min_ngram)
            for end in range(len(context)):
                ngrams.extend(context[end : end + 1])
                for k in (1, 2, 4):
                    assert ngrams.propose(k) == _scan(context[: end + 1], k, max_ngram, min_ngram), (context[: end + 1], k)


def test_ngrams_follow_a_request_whose_context_grows():
    prompt, generated = [1, 2, 3, 4], []
    ngrams = speculative.Ngrams()
    for token in [1, 2, 3, 9, 1, 2]:
        generated.append(token)
        assert ngrams.follow(prompt, generated).tokens == prompt + generated
    assert ngrams.propose(3) == [3, 9, 1]  # the latest (1, 2) with 3 tokens after it
    assert ngrams.follow(prompt, generated).propose(3) == [3, 9, 1]  # nothing new: nothing added
    late = speculative.Ngrams().follow(prompt[:2], [])
    assert late.follow(prompt, generated).tokens == prompt + generated  # the rest of the prompt first


@pytest.mark.parametrize("engine_settings", [{}, {"kv_cache": "int8", "prefix_cache_blocks": 0}])
def test_greedy_output_is_the_targets(tiny, engine_settings):
    config, params, tokenizer = tiny
    settings = {"max_slots": 4, "max_seq_len": 256, **engine_settings}
    with Engine(params, config, tokenizer, **settings) as plain:
        want = _generate(plain)
    with Engine(params, config, tokenizer, draft=speculative.LOOKUP, draft_tokens=3, draft_max_rows=4,
                **settings) as spec:  # every step may speculate (four rows keep different numbers of tokens)
        assert _generate(spec) == want
        stats, rate = spec.stats, spec.acceptance_rate
    assert stats["speculative_steps"] > 0 and stats["drafted_tokens"] > 0 and 0 < rate <= 1
    assert stats["decode_steps"] < max(LENGTHS) - 1  # some steps gained several tokens
    assert spec.draft_stats()["draft"] == "ngram" and spec.draft_config is None  # no draft model, no draft cache


def test_draft_tokens_default_by_the_draft(tiny):
    # A lookup's check of 5 tokens costs about two plain steps on a CPU: 3 tokens a step there.
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64, draft=speculative.LOOKUP) as lookups:
        assert lookups.draft_tokens == engine_lib.LOOKUP_CPU_TOKENS == 3
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64, draft=(params, config)) as drafted:
        assert drafted.draft_tokens == engine_lib.DRAFT_TOKENS == 4
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64, draft=speculative.LOOKUP,
                draft_tokens=2) as told:
        assert told.draft_tokens == 2
    from compress import config as cfg

    for argv in (["generate", "--prompt", "hi"], ["batch", "--input", "in.jsonl", "--output", "out.jsonl"], ["serve"]):
        assert cfg.config_from_args(cli.parse([*argv, "--draft", "ngram"])).draft_tokens is None, argv[0]  # the engine's


def test_on_a_cpu_lookups_speculate_only_while_few_rows_are_busy(tiny):
    # A check of K + 1 tokens a row is compute-bound on a CPU: 4 busy rows decoded 0.67x as fast with
    # lookups on SmolLM2. Four rows of equal length stay busy to the end: no speculative step.
    config, params, tokenizer = tiny
    prompts, lengths = PROMPTS[:3] * 2, (12,) * 6
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=speculative.LOOKUP) as spec:
        assert spec.draft_max_rows == engine_lib.LOOKUP_CPU_ROWS == 2
        want = _generate(spec, prompts, lengths)
        # six prompts: four rows busy (plain steps), then two (lookups)
        assert 0 < spec.stats["speculative_steps"] < spec.stats["decode_steps"]
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=speculative.LOOKUP,
                draft_max_rows=1) as one:
        assert _generate(one, prompts[:4], lengths[:4]) == want[:4] and one.stats["speculative_steps"] == 0
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=(params, config)) as drafted:
        assert drafted.draft_max_rows == 4  # a model draft: no limit unless given
    with pytest.raises(ValueError, match="draft_max_rows must be a positive integer"):
        Engine(params, config, tokenizer, max_slots=4, draft=speculative.LOOKUP, draft_max_rows=0)


def test_rows_filled_in_chunks_beside_lookups_stay_exact(tiny):
    # A long request decodes by lookups while short prompts arrive: they are filled in chunks
    # (those steps are plain ones), then decode beside it.
    config, params, tokenizer = tiny
    settings = {"max_slots": 2, "max_seq_len": 256, "prefix_cache_blocks": 0}
    sampling = [SamplingParams(max_new_tokens=40, ignore_eos=True)] + [SamplingParams(max_new_tokens=6)] * 3
    prompts = [PROMPTS[0], "question one", "question two", "question three"]
    with Engine(params, config, tokenizer, **settings) as plain:
        want = [o.token_ids for o in plain.generate(prompts, sampling)]
    with Engine(params, config, tokenizer, draft=speculative.LOOKUP, draft_tokens=4, **settings) as spec:
        first = spec.submit(prompts[0], sampling[0])
        next(first.deltas())  # decoding
        rest = spec.submit_many(prompts[1:], sampling[1:])
        got = [first.result(120).token_ids] + [r.result(120).token_ids for r in rest]
        assert spec.stats["prefill_chunks"] > 0 and spec.stats["speculative_steps"] > 0
    assert got == want


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 6, "top_p": 0.9}])
def test_sampled_tokens_have_the_targets_distribution(tiny, settings):
    """4,096 seeds, three tokens each after a prompt whose last 2-gram came before: the first token
    from the prefill, then steps that check the lookup's proposal (q one-hot at each proposed
    token) or, where the batch has none, plain ones. Every position's empirical distribution is
    the target's, computed exactly (the acceptance rule itself: the test below)."""
    tokenizer = tiny[2]
    config = decoder.DecoderConfig(vocab_size=8)
    params = decoder.init_params(config, jax.random.key(0), scale=0.1)
    prompt, n = [1, 2, 3, 1, 2], 4096
    want = _enumerated(params, config, prompt, settings)
    with Engine(params, config, tokenizer, max_slots=256, max_seq_len=64, prefix_cache_blocks=0,
                draft=speculative.LOOKUP, draft_tokens=2, draft_max_rows=256) as engine:
        outs = engine.generate([prompt] * n, [SamplingParams(max_new_tokens=3, seed=s, **settings) for s in range(n)])
        assert 0.02 < engine.acceptance_rate < 0.8 and engine.stats["speculative_steps"] > 0
    assert_sampled_as(outs, want)


def test_a_certain_proposal_is_kept_with_the_targets_probability_of_it():
    """`verify` with q one-hot at the proposed token (`certain`), 40,000 rows: the first token a step
    emits is distributed as p, and the proposal is kept with probability p(d). Keeping it always
    would emit d every time; replacing a rejected one from p with d left in would give d
    p(d) (2 - p(d)) = 0.64 instead of 0.4."""
    rows, v, k = 40000, 5, 2
    p = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    seeds, counts = jax.numpy.arange(rows, dtype=jax.numpy.uint32), jax.numpy.zeros(rows, jax.numpy.int32)
    for temperature, top_k, top_p, want in ((1.0, 0, 1.0, np.exp(p)), (0.5, 2, 1.0, np.array([0.64, 0.36, 0, 0, 0]))):
        full = lambda x, dtype: jax.numpy.full(rows, x, dtype)  # noqa: E731
        settings = (full(temperature, np.float32), full(top_k, np.int32), full(top_p, np.float32))
        proposed = jax.numpy.zeros((rows, k), jax.numpy.int32)  # d = token 0 at both positions
        tokens, kept = jax.jit(speculative.verify)(jax.numpy.tile(p, (rows, k + 1, 1)), proposed,
                                                   speculative.certain(proposed, v), seeds, counts, *settings)
        first = np.bincount(np.asarray(tokens[:, 0]), minlength=v) / rows
        np.testing.assert_allclose(first, want, atol=0.01)
        np.testing.assert_allclose(np.mean(np.asarray(kept) >= 1), want[0], atol=0.01)


def test_warmup_compiles_every_lookup_program(tiny):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64, draft=speculative.LOOKUP,
                draft_tokens=3) as engine:
        engine.warmup(prompt_lengths=(16, 32))
        engine.generate("warm", SamplingParams(max_new_tokens=2))
        with compiles.counting() as events:
            outs = engine.generate([PROMPTS[0], "x " * 10], [SamplingParams(max_new_tokens=40, ignore_eos=True),
                                                              SamplingParams(max_new_tokens=20, temperature=0.9, seed=2)])
        assert [len(o.token_ids) for o in outs] == [40, 20]
        assert 0 < engine.stats["speculative_steps"] < engine.stats["decode_steps"]
        assert events == []


def test_the_commands_take_the_lookup_draft(tiny, tmp_path, capsys):
    from compress.formats import hf_decoder

    config, params, tokenizer = tiny
    target = str(tmp_path / "tiny")
    hf_decoder.export(params, config, target, tokenizer=tokenizer)
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": 1, "prompt": PROMPTS[0]}) + "\n")
    assert cli.main(["batch", "--model", target, "--draft", "ngram", "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "20", "--max-seq-len", "128",
                     "--max-slots", "1", "--draft-tokens", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["ok"] == 1 and summary["draft"] == "ngram" and summary["drafted_tokens"] > 0
    from compress import config as cfg
    from serve.commands.generate import GenerateConfig, run_generate

    generate = cfg.load(GenerateConfig, None, [f"model.name={target}", f"prompt={PROMPTS[0]}", "draft=ngram",
                                               "sampling.max_new_tokens=20", "max_seq_len=128"])
    report = run_generate(generate, as_json=True, out=io.StringIO())
    assert report["draft"] == "ngram" and report["drafted_tokens"] > 0
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=128) as plain:
        assert report["token_ids"] == plain.generate(PROMPTS[0], SamplingParams(max_new_tokens=20))[0].token_ids
