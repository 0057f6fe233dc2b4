"""press quantize: a stored int8 SmolLM2 directory holds int8 arrays and serves through the engine;
every other scheme stores, reloads and serves what quantizing in memory gives (on a tiny model
exported as a Hugging Face directory: the format and the serving path, not the real model's
numbers, which the quantization table in BENCHMARKS.md measures)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from compress.formats.safetensors_file import SafetensorsSet
from compress.models import decoder
from compress.pretrained import load_decoder
from compress.commands.quantize import quantize_model
from compress.quant import schemes
from compress.quant.weights import quantize_params
from serve import cli
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.reference import PROMPTS
from tests.tiny_decoder import export_tiny_decoder

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "smollm2-int8")
    summary = quantize_model("smollm2-135m-instruct", "int8", out)
    assert summary["quantized_matrices_fraction_of_bf16"] < 0.55
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_tiny_decoder(str(tmp_path_factory.mktemp("tiny") / "hf"))


def test_directory_holds_integers_and_documents_its_scheme(int8_dir):
    files = SafetensorsSet(int8_dir)
    assert files.read("layers/q/qkernel").dtype == "int8"
    assert files.shape("layers/q/scale") == (30, 1, 9, 64)
    with open(os.path.join(int8_dir, "config.json")) as f:
        assert json.load(f)["press_quantization"] == {"scheme": "int8", "keep_float": ["lm_head"], "format": 2}


def test_loads_as_integers_and_generates_like_the_in_memory_quantized_model(int8_dir):
    stored = load_decoder(int8_dir)
    assert stored.quantization == "int8"
    assert stored.params["layers"]["down"]["qkernel"].dtype == jnp.int8
    float_model = load_decoder("smollm2-135m-instruct")
    in_memory = quantize_params(float_model.params, decoder.PROJECTIONS, schemes.get("int8"))
    params = SamplingParams(max_new_tokens=16)
    with Engine(stored.params, stored.config, stored.tokenizer, max_slots=4, max_seq_len=128) as a, \
            Engine(in_memory, float_model.config, float_model.tokenizer, max_slots=4, max_seq_len=128) as b:
        assert [o.token_ids for o in a.generate(PROMPTS, params)] == [o.token_ids for o in b.generate(PROMPTS, params)]


def test_quantize_command_refuses_bad_requests(int8_dir, tmp_path, capsys):
    assert cli.main(["quantize", "--model", int8_dir, "--scheme", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "already quantized (int8)" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", "smollm2-135m-instruct", "--scheme", "int5", "--out", str(tmp_path / "x")]) == 2
    assert "valid schemes: int8" in capsys.readouterr().err
    assert cli.main(["quantize", "--model", "smollm2-135m-instruct", "--scheme", "int8", "--out", int8_dir]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("scheme", ["int4-g64+kv-int8", "int4-g32-asym", "w8a8", "w4a8-g32-asym", "w8a8-g32"])
def test_every_scheme_stores_reloads_and_serves(scheme, tiny_dir, tmp_path):
    out = str(tmp_path / scheme)
    summary = quantize_model(tiny_dir, scheme, out)
    stored = load_decoder(out)
    assert stored.quantization == scheme
    q = stored.params["layers"]["gate"]
    if schemes.get(scheme).weight_bits == 4:
        group = 64 if "g64" in scheme else 32
        assert q["qkernel"].dtype == jnp.int8 and q["spec"].weight_bits == 4 and q["spec"].zero_point == ("asym" in scheme)
        assert summary["quantized_matrices_fraction_of_bf16"] <= (0.32 if "asym" in scheme else 0.29)
        info = SafetensorsSet(out)
        assert info.shape("layers/gate/qkernel") == (2, 64 // group, group // 2, 128)  # two codes a byte on disk
    else:
        assert q["qkernel"].dtype == jnp.int8
    float_model = load_decoder(tiny_dir)
    in_memory = quantize_params(float_model.params, decoder.PROJECTIONS, schemes.get(scheme))
    params = SamplingParams(max_new_tokens=12)
    with Engine.from_pretrained(out, max_slots=2, max_seq_len=128) as a, \
            Engine(in_memory, float_model.config, float_model.tokenizer, max_slots=2, max_seq_len=128,
                   kv_cache="int8" if "kv-int8" in scheme else None) as b:
        assert a.kv_cache == ("int8" if "kv-int8" in scheme else None)
        got, want = a.generate(PROMPTS[:2], params), b.generate(PROMPTS[:2], params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(o.finish_reason in ("length", "stop") and o.text for o in got)


def test_kv_int8_alone_keeps_float_weights_and_an_int8_cache(tmp_path):
    out = str(tmp_path / "kv")
    quantize_model("smollm2-135m-instruct", "kv-int8", out)
    with Engine.from_pretrained(out, max_slots=1, max_seq_len=64) as engine:
        assert engine.kv_cache == "int8" and engine._cache.k.dtype == jnp.int8
        assert engine.params["layers"]["q"]["kernel"].dtype == jnp.float32
        assert engine.generate("The capital of France is", SamplingParams(max_new_tokens=4))[0].token_ids


def test_smooth_w8a8_is_calibrated_stored_and_served(tiny_dir, tmp_path):
    from compress.quant import smooth
    from compress.quant.gptq import GPTQConfig

    out = str(tmp_path / "sq")
    calibration = GPTQConfig(num_sequences=8, sequence_length=128)
    quantize_model(tiny_dir, "smooth-w8a8", out, calibration=calibration)
    stored = load_decoder(out)
    assert stored.quantization == "smooth-w8a8" and stored.params["layers"]["q"]["spec"].activation_bits == 8
    float_model = load_decoder(tiny_dir)
    # The norms now carry the division (they differ from the float model's) ...
    assert not np.allclose(np.asarray(stored.params["layers"]["attn_norm"]), np.asarray(float_model.params["layers"]["attn_norm"]))
    # ... and the directory serves exactly what smoothing then quantizing in memory gives.
    smoothed = smooth.smooth_decoder(float_model.params, float_model.config, float_model.tokenizer, calibration)
    in_memory = quantize_params(smoothed, decoder.PROJECTIONS, schemes.get("smooth-w8a8"))
    params = SamplingParams(max_new_tokens=12)
    with Engine(stored.params, stored.config, stored.tokenizer, max_slots=2, max_seq_len=128) as a, \
            Engine(in_memory, float_model.config, float_model.tokenizer, max_slots=2, max_seq_len=128) as b:
        assert [o.token_ids for o in a.generate(PROMPTS[:2], params)] == [o.token_ids for o in b.generate(PROMPTS[:2], params)]


def test_a_model_another_process_wrote_meanwhile_is_kept(tmp_path):
    from compress.formats import quantized
    from tests.tiny_decoder import tiny_decoder

    config, params, _ = tiny_decoder()
    qparams = quantize_params(params, decoder.PROJECTIONS, schemes.get("int8"))
    out = tmp_path / "q"

    class Racing:  # another press quantize renames its finished model to OUT while this one writes
        def save_pretrained(self, directory):
            out.mkdir()
            (out / "config.json").write_text("{}")

    with pytest.raises(FileExistsError, match="written by another process meanwhile"):
        quantized.save(qparams, config, schemes.get("int8"), str(out), tokenizer=Racing())
    assert sorted(os.listdir(tmp_path)) == ["q"] and os.listdir(out) == ["config.json"]  # its model kept, no leftovers


def test_a_writer_killed_mid_write_leaves_nothing_once_another_writes(tmp_path):
    from compress.formats import quantized
    from tests.processes import lock_held_elsewhere
    from tests.tiny_decoder import tiny_decoder

    config, params, tokenizer = tiny_decoder()
    qparams = quantize_params(params, decoder.PROJECTIONS, schemes.get("int8"))
    dead, live = tmp_path / f"{quantized.STAGING}dead", tmp_path / f"{quantized.STAGING}live"
    dead.mkdir()  # what kill -9 leaves: a half-written model and its lock file, free
    (dead / "model.safetensors").write_bytes(b"half")
    (tmp_path / f"{dead.name}.lock").write_text("")
    live.mkdir()  # another writer still at work: it holds its lock
    with lock_held_elsewhere(f"{live}.lock"):
        quantized.save(qparams, config, schemes.get("int8"), str(tmp_path / "model"), tokenizer=tokenizer)
    assert sorted(os.listdir(tmp_path)) == sorted(["model", live.name, f"{live.name}.lock"])
