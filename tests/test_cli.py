"""The `press` command: model listing, config errors before any work, and a real generation."""

import json

import pytest

from serve import cli


def test_models_lists_bundled_and_architectures(capsys):
    assert cli.main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in listing["bundled"]}
    assert set(names) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert names["smollm2-135m-instruct"]["installed"] and names["smollm2-135m-instruct"]["path"].endswith(".gguf")
    assert {"llama", "mistral", "qwen2", "bert"} <= set(listing["architectures"])


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a job gets as far as loading a model."""
    import compress.pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("a bad config must fail before the model is loaded")

    monkeypatch.setattr(compress.pretrained, "load_decoder", refuse)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["generate", "--prompt", "hi", "model.dtyp=bfloat16"], "did you mean 'model.dtype'"),
        (["generate", "--prompt", "hi", "sampling.max_new_tokens=many"], "max_new_tokens"),
        (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p"),
        (["generate", "--prompt", "hi", "model.dtype=float8"], "float32"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
        (["generate", "--prompt", "hi", "--system", "be brief"], "chat=true"),
        (["generate"], "prompt is empty"),
        (["generate", "--config", "configs/missing.yaml", "--prompt", "hi"], "configs/missing.yaml"),
    ],
)
def test_bad_config_fails_before_any_work(argv, expected, no_loading, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err, err


def test_unknown_model_names_what_to_pass(capsys):
    assert cli.main(["generate", "--model", "gpt-17", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "smollm2-135m-instruct" in err


def test_shipped_configs_load():
    from compress import config as cfg
    from serve.jobs import GenerateConfig

    demo = cfg.load(GenerateConfig, "configs/demo.yaml")
    assert demo.chat and demo.model.name == "smollm2-135m-instruct" and demo.sampling.greedy
    assert cfg.load(GenerateConfig, "configs/generate.yaml", ['prompt="x: y"']).prompt == "x: y"


@pytest.mark.slow
def test_generate_json_matches_the_engine(capsys):
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    argv = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "12", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=1, max_seq_len=256) as engine:
        want = engine.generate("The capital of France is", SamplingParams(max_new_tokens=12))[0]
    assert report["token_ids"] == want.token_ids and report["text"] == want.text
    assert report["generated_tokens"] == len(want.token_ids) and report["prompt_tokens"] == len(want.prompt_token_ids)
    assert report["decode_tokens_per_second"] > 0


@pytest.mark.slow
def test_generate_streams_chat_text(capsys):
    assert cli.main(["generate", "--chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "40"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out and "tokens/s" in captured.err
