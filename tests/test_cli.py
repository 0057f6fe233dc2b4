"""The `press` command: model listing, config errors before any work, and a real generation."""

import dataclasses
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
    from serve.commands.generate import GenerateConfig

    demo = cfg.load(GenerateConfig, "configs/demo.yaml")
    assert demo.chat and demo.model.name == "smollm2-135m-instruct" and demo.sampling.greedy
    assert cfg.load(GenerateConfig, "configs/generate.yaml", ['prompt="x: y"']).prompt == "x: y"


@pytest.mark.parametrize("command, path, extra, schema", [
    ("quantize", "configs/quantize.yaml", [], "QuantizeConfig"),
    ("eval", "configs/eval.yaml", [], "EvalConfig"),
    ("index build", "configs/index.yaml", [], "IndexBuildConfig"),
    ("batch", "configs/batch.yaml", [], "BatchConfig"),
    ("serve", "configs/serve.yaml", [], "ServeConfig"),
    ("ask", "configs/ask.yaml", ["What is a tuple?"], "AskConfig"),
    ("generate", "configs/generate.yaml", ["prompt=hi"], "GenerateConfig"),
    ("train", "configs/train-tiny.yaml", [], "TrainConfig"),
    ("train", "configs/train-smollm2.yaml", [], "TrainConfig"),
    ("distill", "configs/distill-tiny.yaml", [], "DistillConfig"),
    ("distill", "configs/distill-smollm2.yaml", [], "DistillConfig"),
    ("teacher-cache", "configs/teacher-cache-smollm2.yaml", [], "TeacherCacheConfig"),
    ("synthesize", "configs/synthesize.yaml", [], "SynthesizeConfig"),
])
def test_every_job_reads_its_shipped_config(command, path, extra, schema):
    """`press COMMAND configs/FILE.yaml [word] [key=value]` builds the command's typed config from the file."""
    import yaml

    from compress import config as cfg

    config = cfg.config_from_args(cli.parse([*command.split(), path, *extra]))
    assert type(config).__name__ == schema
    with open(path) as f:
        written = yaml.safe_load(f)
    plain = cfg.to_dict(config)
    overridden = {w.split("=")[0] for w in extra}
    for key, value in written.items():  # every value of the file arrives (sections key by key)
        if key in overridden:
            continue
        if isinstance(value, dict):
            assert {k: plain[key][k] for k in value} == value, key
        else:
            assert plain[key] == value, key


def test_quantize_takes_a_config_file_then_overrides_then_flags(tmp_path):
    from compress import config as cfg

    args = cli.parse(["quantize", "configs/quantize.yaml", "scheme=gptq-int4-g64", "--keep-float", "lm_head,layers/down",
                      "calibration.num_sequences=16"])
    config = cfg.config_from_args(args)
    assert (config.scheme, config.keep_float, config.calibration.num_sequences) == (
        "gptq-int4-g64", ("lm_head", "layers/down"), 16)
    assert config.calibration.sequence_length == 256  # the default, written once in GPTQConfig
    assert config.out_dir == "out/smollm2-135m-instruct-gptq-int4-g64"
    # key=value after a flag is still an override; the last word wins.
    assert cfg.config_from_args(cli.parse(["quantize", "--scheme", "int8", "scheme=w8a8"])).scheme == "w8a8"


@pytest.mark.parametrize("argv, expected", [
    (["quantize", "scheme=int3"], "key 'scheme': unknown quantization scheme 'int3'"),
    (["quantize", "configs/quantize.yaml", "calibration.num_sequencs=4"], "did you mean 'calibration.num_sequences'"),
    (["quantize", "calibration.sequence_length=0"], "GPTQConfig.sequence_length must be a positive integer"),
    (["eval", "--model", "m", "windows=0"], "EvalConfig.windows must be an integer >= 1"),
    (["eval"], "no models"),
    (["index", "build", "--index", "x"], "missing required key(s) 'docs'"),
    (["index", "build", "chunking.overlap=500", "--index", "x", "--docs", "a"], "overlap=500"),
    (["index", "search", "--index", "x", "q", "k=0"], "k must be at least 1"),
    (["ask", "--index", "x", "--model", "m"], "missing required key(s) 'question'"),
    (["batch", "--input", "a.jsonl"], "missing required key(s) 'output'"),
    (["serve", "port=70000"], "port must be 0..65535"),
    (["quantize", "configs/quantize.yaml", "configs/eval.yaml"], "unexpected word"),
])
def test_every_job_checks_its_config_before_any_work(argv, expected, no_loading, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_internal_error_prints_its_traceback_and_exits_1(monkeypatch, capsys):
    """A bug (not bad input) is never hidden behind a one-line message."""
    from compress.commands import models

    def broken(args, out=None):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(models, "run", broken)
    assert cli.main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "an internal invariant broke" in err and "bug in press" in err


def test_debug_shows_the_traceback_of_bad_input(no_loading, capsys):
    assert cli.main(["--debug", "quantize", "scheme=int3"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "unknown quantization scheme" in err


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


def test_serve_settings_reach_the_engine(monkeypatch):
    """Every `press serve` setting the engine takes arrives there by its name (key=value words)."""
    import inspect

    from compress import config as cfg
    from serve.commands import serve as serve_command
    from serve.engine import Engine

    seen = {}
    monkeypatch.setattr(Engine, "from_pretrained", lambda name, **kwargs: seen.update(kwargs, name=name))
    config = cfg.config_from_args(cli.parse(
        ["serve", "--model", "some/dir", "chunk_wait_steps=4", "compact_rows=false", "share_cap=false", "preempt=false",
         "prefill_delay=0.5", "chunked_prefill=false", "prefix_cache_blocks=0", "max_slots=3", "max_queued=5"]))
    serve_command.make_engine(config)
    assert (seen["name"], seen["chunk_wait_steps"], seen["compact_rows"], seen["max_queued"]) == ("some/dir", 4, False, 5)
    engine_settings = set(inspect.signature(Engine.__init__).parameters)
    shared = [f.name for f in dataclasses.fields(config) if f.name in engine_settings and f.name != "adapters"]
    assert len(shared) >= 10 and {name: seen[name] for name in shared} == {name: getattr(config, name) for name in shared}


def test_batch_settings_reach_the_engine(monkeypatch, tmp_path):
    """Every `press batch` setting the engine takes arrives there by its name, the model's too."""
    import inspect

    import jax

    from compress import config as cfg
    from serve.commands import batch as batch_command
    from serve.engine import Engine

    class Loaded(Exception):
        pass

    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        raise Loaded

    monkeypatch.setattr(Engine, "from_pretrained", from_pretrained)
    (tmp_path / "in.jsonl").write_text('{"id": "a", "prompt": "hi"}\n')
    config = cfg.config_from_args(cli.parse(
        ["batch", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--model", "some/dir",
         "draft=ngram", "draft_tokens=2", "draft_max_rows=3", "max_slots=8", "max_seq_len=96", "model.dtype=bfloat16"]))
    with pytest.raises(Loaded):
        batch_command.run_config(config)
    assert (seen["name"], seen["draft"], seen["draft_tokens"], seen["draft_max_rows"]) == ("some/dir", "ngram", 2, 3)
    assert (seen["dtype"], seen["max_seq_len"]) == ("bfloat16", 96)
    assert (seen["mesh"] is None) == (len(jax.local_devices()) == 1)  # several devices: rows over all of them
    engine_settings = set(inspect.signature(Engine.__init__).parameters)
    shared = [f.name for f in dataclasses.fields(config) if f.name in engine_settings and f.name != "adapters"]
    assert len(shared) >= 5 and {name: seen[name] for name in shared} == {name: getattr(config, name) for name in shared}
