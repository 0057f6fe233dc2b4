"""Speculative decoding: a draft proposes, the target checks K + 1 tokens in one pass. Greedy output
is the target's own token for token; sampled output has the target's distribution."""

import dataclasses
import io
import itertools
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress.errors import InputError
from compress.formats.registry import ModelLocation
from compress.models import decoder
from serve import cli, speculative
from serve.engine import Engine
from serve.metrics import ServerMetrics
from serve.sampling import SamplingParams, probabilities, sample
from tests import compiles
from tests.tiny_decoder import export_tiny_decoder, tiny_decoder

SYSTEM = "You answer questions about the Python language reference, briefly and with care. " * 2
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog. " * 3, "Once upon a time",
           [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a tuple?"}]]
LENGTHS = (24, 9, 17, 30)  # max_new_tokens of each prompt


@pytest.fixture(scope="module")
def tiny():
    return tiny_decoder()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny_decoder() as a Hugging Face directory, loaded the way a user's model is."""
    return export_tiny_decoder(str(tmp_path_factory.mktemp("speculative") / "target"))


@pytest.fixture(scope="module")
def drafts(tiny):
    """Drafts that agree with the target never (another random model), always (the target itself)
    and about two times in three (the target's weights slightly perturbed)."""
    config, params, _ = tiny
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    close = jax.tree.unflatten(tree, [x + 0.003 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return {"other": (tiny_decoder(seed=1)[1], config), "itself": (params, config), "close": (close, config)}


def _greedy(engine, prompts=PROMPTS, lengths=LENGTHS, **sampling):
    return [o.token_ids for o in engine.generate(prompts, [SamplingParams(max_new_tokens=n, **sampling)
                                                           for n in lengths])]


@pytest.mark.parametrize("which", ["other", "itself", "close"])
def test_greedy_output_is_the_targets_whatever_the_draft_proposes(tiny, drafts, which):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256) as plain:
        want = _greedy(plain)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=drafts[which], draft_tokens=3) as spec:
        assert _greedy(spec) == want  # four prompts of different lengths in one batch
        rate, stats = spec.acceptance_rate, spec.stats
    assert stats["speculative_steps"] == stats["decode_steps"] and stats["drafted_tokens"] > 0
    if which == "itself":
        assert rate == 1.0
        assert stats["decode_steps"] == -(-(max(LENGTHS) - 1) // 4)  # 4 tokens a target pass
    elif which == "other":
        assert rate < 0.1  # rejections at almost every position: the replacement path
    else:
        assert 0.3 < rate < 0.9  # rows keep different numbers of tokens in one step
        assert stats["decode_steps"] < max(LENGTHS) - 1


def test_a_one_row_engine_tiles_its_weights_only_while_its_checks_fit_the_tiled_rows(tiny, drafts):
    """A speculative step checks 1 + K tokens a row, so a one-slot engine stores the target's weights
    tiled (the kernels' few-row layout) only while 1 + K <= TILED_ROWS; the draft, a row a step,
    stays tiled. Either way the greedy tokens are the target's alone."""
    from compress.kernels import cpu as cpu_kernels
    from serve import engine as engine_module

    config, params, tokenizer = tiny
    prompts, lengths = PROMPTS[:2], LENGTHS[:2]
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=128, prefix_cache_blocks=0) as plain:
        want = _greedy(plain, prompts, lengths)
    kernels = cpu_kernels.available()
    for k in (engine_module.TILED_ROWS - 1, engine_module.TILED_ROWS):
        with Engine(params, config, tokenizer, max_slots=1, max_seq_len=128, prefix_cache_blocks=0,
                    draft=drafts["close"], draft_tokens=k) as spec:
            target, draft = spec.params["layers"]["up"].get("spec"), spec.draft_params["layers"]["up"].get("spec")
            assert (target is not None and target.tiled) == (kernels and 1 + k <= engine_module.TILED_ROWS), k
            assert (draft is not None and draft.tiled) == kernels
            assert _greedy(spec, prompts, lengths) == want, k


@pytest.mark.parametrize("kv_cache, prefix_blocks", [(None, 0), (None, 64), ("int8", 64)])
def test_greedy_equality_holds_with_the_prefix_cache_and_an_int8_cache(tiny, drafts, kv_cache, prefix_blocks):
    config, params, tokenizer = tiny
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
             for q in ("What is a tuple?", "hi", "Is None a singleton?")]
    kwargs = dict(max_slots=4, max_seq_len=256, kv_cache=kv_cache, prefix_cache_blocks=prefix_blocks)
    with Engine(params, config, tokenizer, **kwargs) as plain:
        want = [_greedy(plain, chats[:1], (12,)), _greedy(plain, chats[1:], (20, 7))]
    with Engine(params, config, tokenizer, draft=drafts["close"], **kwargs) as spec:
        got = [_greedy(spec, chats[:1], (12,)), _greedy(spec, chats[1:], (20, 7))]  # the second reuses the system prompt
        if prefix_blocks:
            assert spec.stats["prefix_tokens_reused"] > 0
        assert spec.stats["accepted_tokens"] > 0
    assert got == want


def test_greedy_stops_at_the_targets_eos_stop_token_and_stop_string(tiny, drafts):
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256) as plain:
        free = plain.generate(PROMPTS[:3], SamplingParams(max_new_tokens=30))
    eos = free[0].token_ids[11]  # a token the target emits: its EOS from now on
    stop_token = free[1].token_ids[7]
    stop = next(free[2].text[i : i + 3] for i in range(5, len(free[2].text)) if free[2].text[i : i + 3].strip())
    config = dataclasses.replace(config, eos_token_ids=(eos,))
    sampling = [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, stop_token_ids=(stop_token,)),
                SamplingParams(max_new_tokens=30, stop=(stop,))]
    runs = []
    for draft in (None, drafts["itself"], drafts["close"]):  # all kept: the stop lands inside a step's tokens
        with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=draft, draft_tokens=4) as engine:
            runs.append([(o.token_ids, o.text, o.finish_reason) for o in engine.generate(PROMPTS[:3], sampling)])
    assert runs[1] == runs[0] and runs[2] == runs[0]
    assert [reason for *_, reason in runs[0]] == ["stop"] * 3 and len(runs[0][0][0]) <= 11


def test_rows_near_the_end_of_the_context_take_plain_steps_and_stay_exact(tiny, drafts):
    config, params, tokenizer = tiny
    prompts = [list(range(100, 100 + n)) for n in (3, 20, 40)]
    lengths = [64 - len(p) for p in prompts]  # every row runs to the last slot of the context
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=64, prefix_cache_blocks=0) as plain:
        want = _greedy(plain, prompts, lengths)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=64, prefix_cache_blocks=0,
                draft=drafts["close"], draft_tokens=4) as spec:
        assert _greedy(spec, prompts, lengths) == want
        assert 0 < spec.stats["speculative_steps"] < spec.stats["decode_steps"]  # some plain steps at the end


def test_a_preempted_row_is_prefilled_into_both_caches_again_and_continues_exactly(tiny, drafts):
    config, params, tokenizer = tiny
    prompts = [f"Story number {i} begins on a ship" for i in range(4)]
    greedy = SamplingParams(max_new_tokens=40)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=128, preempt=False) as plain:
        want = _greedy(plain, prompts, (40,) * 4)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=128, draft=drafts["close"]) as spec:
        fan_out = spec.submit_many(prompts, [greedy] * 4)
        deadline = time.monotonic() + 60
        while spec.running < 4 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert len(spec.submit("A short question?", SamplingParams(max_new_tokens=4)).result(60).token_ids) == 4
        assert [r.result(120).token_ids for r in fan_out] == want
        assert spec.stats["preempted"] >= 1 and sum(r.preemptions for r in fan_out) >= 1


def _enumerated(params, config, prompt, settings):
    """The exact distribution [V, V, V] of the first three tokens a model samples after `prompt`."""
    v = config.vocab_size
    pairs = np.array(list(itertools.product(range(v), repeat=2)), np.int32)  # every (t1, t2)
    logits = decoder.forward(params, jnp.asarray(np.concatenate([np.tile(prompt, (v * v, 1)), pairs], 1)),
                             config).logits  # [V * V, P + 2, V]
    n = v * v
    dist = lambda x: np.asarray(probabilities(x, jnp.full(n, settings["temperature"]),  # noqa: E731
                                              jnp.full(n, settings.get("top_k", 0), jnp.int32),
                                              jnp.full(n, settings.get("top_p", 1.0))))
    p1 = dist(logits[:, len(prompt) - 1])[0]  # [V]
    p2 = dist(logits[:, len(prompt)]).reshape(v, v, v)[:, 0]  # [t1, t2]
    p3 = dist(logits[:, len(prompt) + 1]).reshape(v, v, v)  # [t1, t2, t3]
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("settings", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 6, "top_p": 0.9}])
def test_sampled_tokens_have_the_targets_distribution(tiny, settings):
    """4,096 seeds, three tokens each (the first from the prefill, then steps of K = 2): the
    empirical distribution of every position is the target's, computed exactly (here 0.012-0.017
    away in total variation). Replacing with a draw from p instead of max(0, p - q), swapping p
    and q in the test or always accepting puts the second and third tokens 0.11-0.69 away (tried,
    both settings); the bound is 0.05."""
    tokenizer = tiny[2]
    config = decoder.DecoderConfig(vocab_size=8)  # small enough to enumerate; token ids as prompts
    params = decoder.init_params(config, jax.random.key(0), scale=0.1)
    draft = decoder.init_params(config, jax.random.key(1), scale=0.1)
    prompt, n = [1, 2, 3, 4, 5], 4096
    want = _enumerated(params, config, prompt, settings)
    proposed = _enumerated(draft, config, prompt, settings)
    with Engine(params, config, tokenizer, max_slots=256, max_seq_len=64, prefix_cache_blocks=0,
                draft=(draft, config), draft_tokens=2) as engine:
        outs = engine.generate([prompt] * n, [SamplingParams(max_new_tokens=3, seed=s, **settings) for s in range(n)])
        assert 0.1 < engine.acceptance_rate < 0.8  # both acceptances and rejections, many of each
    assert_sampled_as(outs, want)
    for others in MARGINALS[1:]:  # the bound tells the target's tokens from the draft's
        assert _total_variation(proposed.sum(others), want.sum(others)) > 0.2


MARGINALS = [(1, 2), (0, 2), (0, 1)]  # the axes summed out of [V, V, V] for the first, second and third token


def _total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def assert_sampled_as(outs, want: np.ndarray) -> None:
    """The three tokens of each output, counted: each position's distribution within 0.05 of
    `want`'s (total variation) and the joint within 0.2 (512 outcomes; 4,096 draws of the exact
    joint differ from it by ~0.12)."""
    counts = np.zeros(want.shape)
    for o in outs:
        counts[tuple(o.token_ids)] += 1
    got = counts / len(outs)
    for position, others in enumerate(MARGINALS):
        assert _total_variation(got.sum(others), want.sum(others)) < 0.05, position
    assert _total_variation(got, want) < 0.2


def test_the_acceptance_rule_keeps_the_targets_distribution_exactly():
    """`verify` on fixed distributions, one row per key: the first token a step emits is p's."""
    rows, v, k = 40000, 5, 2
    p = np.log(np.array([0.4, 0.3, 0.15, 0.1, 0.05], np.float32))
    q = np.log(np.array([0.1, 0.15, 0.5, 0.05, 0.2], np.float32))
    seeds, counts = jnp.arange(rows, dtype=jnp.uint32), jnp.zeros(rows, jnp.int32)
    ones, zeros = jnp.ones(rows), jnp.zeros(rows, jnp.int32)
    draft_logits = jnp.tile(q, (rows, k, 1))
    draft_tokens = jnp.stack([speculative.propose(draft_logits[:, j], seeds, counts + j, ones, zeros, ones)
                              for j in range(k)], axis=1)
    tokens, kept = jax.jit(speculative.verify)(jnp.tile(p, (rows, k + 1, 1)), draft_tokens, draft_logits, seeds,
                                               counts, ones, zeros, ones)
    first = np.bincount(np.asarray(tokens[:, 0]), minlength=v) / rows
    np.testing.assert_allclose(first, np.exp(p), atol=0.01)
    beta = np.minimum(np.exp(p), np.exp(q)).sum()  # the chance one draft token is kept
    np.testing.assert_allclose(np.mean(np.asarray(kept) >= 1), beta, atol=0.01)
    # Greedy rows in the same batch: the target's argmax, whatever the draft said.
    temperature = jnp.where(jnp.arange(rows) % 2 == 0, 0.0, 1.0)
    tokens, kept = speculative.verify(jnp.tile(p, (rows, k + 1, 1)), draft_tokens, draft_logits, seeds, counts,
                                      temperature, zeros, ones)
    greedy = np.asarray(tokens[::2])
    assert (greedy == 0).all() and np.array_equal(np.asarray(kept[::2]), np.cumprod(
        np.asarray(draft_tokens[::2]) == 0, axis=1).sum(1))


def test_probabilities_are_the_distribution_sample_draws_from():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.07, 0.03]] * 4))
    temperature, top_k, top_p = jnp.array([1.0, 0.5, 1.0, 0.0]), jnp.array([0, 2, 0, 0]), jnp.array([1.0, 1.0, 0.8, 1.0])
    probs = np.asarray(probabilities(logits, temperature, top_k, top_p))
    np.testing.assert_allclose(probs[0], [0.5, 0.25, 0.15, 0.07, 0.03], atol=1e-6)
    np.testing.assert_allclose(probs[1], [0.8, 0.2, 0, 0, 0], atol=1e-6)  # squared, top 2: 0.25 / 0.3125
    np.testing.assert_allclose(probs[2], np.array([0.5, 0.25, 0.15, 0, 0]) / 0.9, atol=1e-6)
    np.testing.assert_array_equal(probs[3], [1, 0, 0, 0, 0])
    n = 20000
    for row in range(3):
        rep = lambda x: jnp.full(n, x[row], x.dtype)  # noqa: E731
        drawn = jax.jit(sample)(jnp.tile(logits[row], (n, 1)), jnp.full(n, 3, jnp.uint32), jnp.arange(n, dtype=jnp.int32),
                                rep(temperature), rep(top_k), rep(top_p))
        np.testing.assert_allclose(np.bincount(np.asarray(drawn), minlength=5) / n, probs[row], atol=0.015)


def test_a_seeded_request_samples_the_same_tokens_alone_or_in_a_batch(tiny, drafts):
    config, params, tokenizer = tiny
    sampling = SamplingParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=11)
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=drafts["close"]) as engine:
        alone = engine.generate(PROMPTS[2], sampling)[0].token_ids
        again = engine.generate(PROMPTS[2], sampling)[0].token_ids
        # Another row, other rows beside it (greedy, sampled with another seed) ending at other steps.
        batched = engine.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [
            SamplingParams(max_new_tokens=5), sampling, SamplingParams(max_new_tokens=30, temperature=1.0, seed=1)])
        assert engine.stats["accepted_tokens"] > 0
    assert alone == again and len(alone) == 16
    assert batched[1].token_ids == alone


def test_warmup_compiles_every_speculative_program(tiny, drafts):
    config, params, tokenizer = tiny
    # One row and 64 slots: one shape of each program (a second row or width would only repeat them).
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64, draft=drafts["close"], draft_tokens=3) as engine:
        engine.warmup(prompt_lengths=(16,))
        engine.generate("warm", SamplingParams(max_new_tokens=2))  # see decode_speed: a first call's committed arrays
        with compiles.counting() as events:
            outs = engine.generate(["a b c", "x " * 10], [SamplingParams(max_new_tokens=48, ignore_eos=True),
                                                           SamplingParams(max_new_tokens=30, temperature=0.9, seed=2)])
        assert [len(o.token_ids) for o in outs] == [48, 30]
        assert 0 < engine.stats["speculative_steps"] < engine.stats["decode_steps"]  # plain steps at the end too
        assert events == []  # prefills of both models, speculative and plain steps, sampled and greedy: all compiled


def test_a_draft_must_share_the_targets_vocabulary(tiny):
    config, params, tokenizer = tiny
    small = dataclasses.replace(config, vocab_size=300)
    with pytest.raises(InputError, match=r"draft 'the draft' has a vocabulary of 300 tokens and the target 'tiny'"):
        Engine(params, config, tokenizer, name="tiny", draft=(decoder.init_params(small, jax.random.key(0)), small))

    first, second = sorted(tokenizer.get_vocab())[:2]

    class Renumbered:  # SmolLM2's tokenizer with two tokens' ids swapped
        def get_vocab(self):
            vocab = dict(tokenizer.get_vocab())
            vocab[first], vocab[second] = vocab[second], vocab[first]
            return vocab

    loaded = types.SimpleNamespace(params=params, config=config, tokenizer=Renumbered(),
                                   location=ModelLocation("out/other-student", "hf"))
    ids = tokenizer.get_vocab()
    with pytest.raises(InputError, match=f"draft 'out/other-student' numbers the token {first!r} {ids[second]} where "
                                         f"the target 'tiny' numbers it {ids[first]}"):
        Engine(params, config, tokenizer, name="tiny", draft=loaded)
    with pytest.raises(InputError, match="draft_tokens must be an integer in"):
        Engine(params, config, tokenizer, draft=(params, config), draft_tokens=0)
    with pytest.raises(InputError, match="cannot be served with a draft"):
        Engine(params, config, tokenizer, draft=(params, config), adapters={"a": "some/dir"})
    engine = Engine(params, config, tokenizer, draft=(params, config), chunked_prefill=True)
    assert not engine.chunked_prefill  # a draft's steps check whole rows: no chunks
    engine.close()


def test_the_commands_take_a_draft_and_report_its_acceptance(exported, tmp_path, capsys):
    from compress import config as cfg
    from serve.commands import serve as serve_command
    from serve.commands.generate import GenerateConfig, run_generate

    for argv in (["generate", "--prompt", "hi"], ["batch", "--input", "in.jsonl", "--output", "out.jsonl"], ["serve"]):
        config = cfg.config_from_args(cli.parse([*argv, "--draft", "out/student/hf", "--draft-tokens", "6"]))
        assert (config.draft, config.draft_tokens) == ("out/student/hf", 6), argv[0]
        assert cfg.config_from_args(cli.parse(argv)).draft is None
        assert cli.main([*argv, "--draft", "x", "--draft-tokens", "0"]) == 2
        assert "draft_tokens must be in [1, 16]" in capsys.readouterr().err
    target = exported
    generate = cfg.load(GenerateConfig, None, [f"model.name={target}", "prompt=Once upon a time", f"draft={target}",
                                               "sampling.max_new_tokens=12", "draft_tokens=3", "max_seq_len=64"])
    out = io.StringIO()
    report = run_generate(generate, as_json=True, out=out)
    assert json.loads(out.getvalue()) == report
    assert report["acceptance_rate"] == 1.0 and report["drafted_tokens"] > 0 and report["draft"] == target
    plain = run_generate(dataclasses.replace(generate, draft=None), as_json=True, out=io.StringIO())
    assert plain["token_ids"] == report["token_ids"] and "acceptance_rate" not in plain
    run_generate(generate, as_json=False, out=io.StringIO())
    assert "draft acceptance 1.00 (" in capsys.readouterr().err
    # press batch prints the acceptance in its summary; press serve's engine has the draft, and /metrics says so.
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "a b c"}\n{"id": 2, "prompt": "x"}\n')
    assert cli.main(["batch", "--model", target, "--draft", target, "--input", str(tmp_path / "in.jsonl"),
                     "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "8", "--max-seq-len", "64",
                     "--max-slots", "1", "--draft-tokens", "3", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["ok"] == 2 and summary["draft"] == target and summary["draft_tokens"] == 3
    assert summary["drafted_tokens"] > 0 and summary["acceptance_rate"] == 1.0
    serving = cfg.load(serve_command.ServeConfig, None, [f"model.name={target}", f"draft={target}", "max_slots=1",
                                                         "max_seq_len=64", "draft_tokens=3"])
    with serve_command.make_engine(serving) as engine:
        assert engine.draft_name == target and engine.draft_tokens == 3
        engine.generate("a b c", SamplingParams(max_new_tokens=10))
        metrics = ServerMetrics(engine).render().decode()
    assert "press_draft_acceptance_rate 1.0" in metrics and "press_draft_tokens_total" in metrics


def test_a_quantized_draft_directory_is_loaded_like_the_target(exported, tmp_path):
    from compress.commands.quantize import quantize_model

    target = exported
    quantize_model(target, "int8", str(tmp_path / "int8"))
    prompts = PROMPTS[:3]
    with Engine.from_pretrained(target, max_slots=4, max_seq_len=128) as plain:
        want = _greedy(plain, prompts, (20, 20, 20))
    with Engine.from_pretrained(target, draft=str(tmp_path / "int8"), draft_tokens=4, max_slots=4,
                                max_seq_len=128) as spec:
        assert spec.draft_params["layers"]["q"]["qkernel"].dtype == jnp.int8  # served from its integers
        assert _greedy(spec, prompts, (20, 20, 20)) == want
        assert spec.acceptance_rate > 0.3


def test_rows_moved_down_take_their_draft_rows_along(tiny, drafts):
    config, params, tokenizer = tiny
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 30, 3, 40)]
    prompts = [f"question {i} about the language" for i in range(4)]
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256) as plain:
        want = [o.token_ids for o in plain.generate(prompts, sampling)]
    with Engine(params, config, tokenizer, max_slots=4, max_seq_len=256, draft=drafts["close"], draft_tokens=3) as spec:
        assert [o.token_ids for o in spec.generate(prompts, sampling)] == want
        assert spec.stats["rows_moved"] >= 1  # rows 0 and 2 end first: row 3 moves to row 0, its draft row too
