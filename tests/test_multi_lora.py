"""Several LoRA adapters served at once (compress/adapters/bank.py in serve/engine.py): each row of
a batch runs its own adapter, and greedy output with an adapter equals the merged model's."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from compress.adapters import bank, lora
from compress.adapters import peft as peft_format
from compress.errors import InputError
from compress.models import decoder
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.tiny_decoder import tiny_decoder

ENGINE = dict(max_slots=4, max_seq_len=64, compilation_cache=False)
PROMPTS = ["The for statement", "Assignment binds", "A class is", "The with statement"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


def _adapter(params, config, lora_config, seed):
    """A trained-looking adapter: random factors (B is zero at init, the identity)."""
    factors, rest = lora.split(lora.add(params, config, lora_config, jax.random.key(seed)))
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(jax.tree.leaves(factors))))
    factors = jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape), factors)
    return lora.adapters(lora.join(rest, factors))


@pytest.fixture(scope="module")
def model():
    config, params, tokenizer = tiny_decoder()
    adapters = {"reference-style": _adapter(params, config, lora.LoraConfig(rank=4, alpha=8), 1),
                "terse": _adapter(params, config, lora.LoraConfig(rank=2, alpha=2, targets=("layers/(q|down)",)), 2)}
    return config, params, tokenizer, adapters


@pytest.fixture(scope="module")
def served(model):
    """An engine serving both adapters, and the greedy texts each adapter's merged model gives."""
    config, params, tokenizer, adapters = model
    expected = {}
    for name, adapter in adapters.items():
        with Engine(lora.merge(lora.attach(params, adapter)), config, tokenizer, **ENGINE) as merged:
            expected[name] = _texts(merged)
    with Engine(params, config, tokenizer, **ENGINE) as base:
        expected["tiny"] = _texts(base)
    with Engine(params, config, tokenizer, name="tiny", adapters=adapters, **ENGINE) as engine:
        yield engine, expected


def _texts(engine, adapter=None):
    return [out.text for out in engine.generate(PROMPTS, GREEDY, adapter=adapter)]


def test_the_bank_gives_each_row_the_forward_pass_of_its_own_adapter(model):
    config, params, _, adapters = model
    stacked = bank.make_bank(list(adapters.values()), config)
    tokens = jax.numpy.asarray(np.arange(36).reshape(3, 12) * 11 % config.vocab_size)
    rows = jax.numpy.asarray([2, 0, 1], np.int32)
    out = decoder.forward(bank.with_bank(params, stacked, rows), tokens, config).logits
    for i, tree in enumerate([lora.attach(params, adapters["terse"]), params,
                              lora.attach(params, adapters["reference-style"])]):
        np.testing.assert_allclose(out[i], decoder.forward(tree, tokens[i : i + 1], config).logits[0], atol=1e-5)


def test_greedy_output_with_each_adapter_equals_the_merged_models_in_one_mixed_batch(served):
    engine, expected = served
    assert engine.adapters == ("reference-style", "terse")
    assert len({tuple(v) for v in expected.values()}) == 3  # the adapters change the output
    # Every prompt under every adapter, submitted together: rows of one batch run different adapters.
    requests = [(name, i, engine.submit(p, GREEDY, adapter=name)) for name in expected for i, p in enumerate(PROMPTS)]
    for name, i, request in requests:
        assert request.result().text == expected[name][i], (name, i)


def test_a_peft_directory_serves_like_the_adapter_it_holds(model, tmp_path):
    config, params, tokenizer, adapters = model
    peft_format.export(lora.attach(params, adapters["terse"]), str(tmp_path / "terse"))
    with Engine(params, config, tokenizer, adapters={"from-disk": str(tmp_path / "terse"), **adapters},
                **ENGINE) as engine:
        assert _texts(engine, "from-disk") == _texts(engine, "terse")


def test_the_prefix_cache_keeps_each_adapters_blocks_apart(model):
    config, params, tokenizer, adapters = model
    prompt = "x " * 40  # several full blocks
    with Engine(params, config, tokenizer, adapters=adapters, prefix_cache_blocks=64, **ENGINE) as engine:
        first = {name: engine.generate(prompt, GREEDY, adapter=name)[0].text for name in (None, *adapters)}
        again = {name: engine.generate(prompt, GREEDY, adapter=name)[0].text for name in (None, *adapters)}
        assert engine.stats["prefix_tokens_reused"] > 0 and first == again
    with Engine(lora.merge(lora.attach(params, adapters["terse"])), config, tokenizer, **ENGINE) as merged:
        assert merged.generate(prompt, GREEDY)[0].text == first["terse"]


def test_unknown_or_clashing_adapter_names_are_refused(model, served):
    config, params, tokenizer, adapters = model
    engine, _ = served
    with pytest.raises(InputError, match="no adapter named 'nope'.*reference-style, terse"):
        engine.submit("hi", GREEDY, adapter="nope")
    out = engine.generate(["hi"], GREEDY, adapter="nope")[0]
    assert out.finish_reason == "error" and "no adapter named" in out.error
    with pytest.raises(InputError, match="a name of its own"):
        Engine(params, config, tokenizer, name="base", adapters={"base": adapters["terse"]}, **ENGINE)


def test_the_server_lists_adapters_as_models_and_the_model_field_picks_one(served):
    import threading

    import openai

    from serve.server import make_server

    engine, expected = served
    server = make_server(engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        models = client.models.list().data
        assert [m.id for m in models] == ["tiny", "reference-style", "terse"]
        for name in ("tiny", "terse", "reference-style"):
            out = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=12, temperature=0)
            assert out.model == name and out.choices[0].text == expected[name][1], name
        with pytest.raises(openai.NotFoundError, match="`tiny`, `reference-style`, `terse`"):
            client.completions.create(model="other", prompt="x", max_tokens=2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_batch_line_names_its_adapter_and_a_bad_name_fails_that_line_only(served, tmp_path):
    from serve.batch import run_batch

    engine, expected = served
    lines = [{"id": 1, "prompt": PROMPTS[0], "adapter": "terse"}, {"id": 2, "prompt": PROMPTS[0]},
             {"id": 3, "prompt": PROMPTS[0], "adapter": "reference-style"}, {"id": 4, "prompt": "x", "adapter": "nope"},
             {"id": 5, "prompt": "x", "adapter": 7}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                        defaults=GREEDY, progress=False)
    assert summary["ok"] == 3 and summary["errors"] == 2
    texts = {r["id"]: r["text"] for r in map(json.loads, open(tmp_path / "out.jsonl"))}
    assert texts == {1: expected["terse"][0], 2: expected["tiny"][0], 3: expected["reference-style"][0]}
    errors = [json.loads(line) for line in open(tmp_path / "out.errors.jsonl")]
    assert [e["line"] for e in errors] == [4, 5] and "no adapter named 'nope'" in errors[0]["error"]
    assert "'adapter' must be a string" in errors[1]["error"]
