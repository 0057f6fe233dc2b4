"""`press finetune` end to end on a tiny model: LoRA checkpoints hold the adapter alone, the
exported adapter loads in `peft` with the logits of the merged model, QLoRA trains on a stored
int8 base, partial fine-tuning leaves frozen weights bit-identical, and a resumed run
continues with the losses of an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from compress import config as cfg
from compress import pretrained
from compress.adapters import lora
from compress.adapters import peft as peft_format
from compress.commands.quantize import quantize_model
from compress.errors import InputError
from compress.finetune.job import FinetuneConfig, finetune
from compress.formats import safetensors_file
from compress.models import decoder
from serve import cli
from tests.tiny_decoder import export_tiny_decoder

SETTINGS = ["data.sources=[pydoc-qa]", "data.seq_len=128", "data.batch_size=8", "optimizer.learning_rate=1e-2",
            "optimizer.warmup_steps=1", "optimizer.total_steps=4", "steps=4", "log_every=1", "eval_every=0",
            "save_every=2", "progress=false", "lora.rank=4", "lora.alpha=8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return export_tiny_decoder(str(tmp_path_factory.mktemp("finetune") / "tiny"), with_eos=True)


def _run(out, *overrides, log=None):
    return finetune(cfg.load(FinetuneConfig, None, [*SETTINGS, f"out={out}", *overrides]), log=log)


def _losses(out):
    return [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl")) if '"split"' not in line]


def _tensors(directory):
    f = safetensors_file.SafetensorsFile(os.path.join(directory, "model.safetensors"))
    return {name: np.asarray(f.read(name)) for name in f.names()}


def _bytes(directory):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files)


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    notes = []
    result = _run(out, f"model.name={tiny_dir}", "eval_every=4", "eval_sources=[pydoc-qa]", "eval_batches=3",
                  "eval_at_start=true", log=notes.append)
    return out, result, notes


def test_lora_trains_the_adapter_alone_and_checkpoints_only_it(tiny_dir, lora_run):
    out, result, notes = lora_run
    assert result.steps == 4 and all(np.isfinite(_losses(out)))
    assert any("LoRA: rank 4 on 7 projections" in n and "% of the model's" in n for n in notes)
    evals = {line["step"]: line["loss"] for line in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
             if line.get("split") == "eval"}
    assert sorted(evals) == [0, 4] and evals[4] < evals[0]  # held-out answers, before and after
    model_bytes = os.path.getsize(os.path.join(tiny_dir, "model.safetensors"))
    step = os.path.join(out, "checkpoints", "4")
    assert _bytes(step) < 0.1 * model_bytes  # adapter + its Adam moments, not the model
    adapter = os.path.join(out, "adapter")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_merged_export_and_the_peft_adapter_on_transformers_give_the_same_logits(tiny_dir, lora_run):
    import peft
    import torch
    import transformers

    out, _, _ = lora_run
    tokens = torch.tensor([[1, 50, 700, 3000, 12, 9, 444]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "hf"))(tokens).logits.numpy()
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)
        with_adapter = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter"))(tokens).logits.numpy()
        plain = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)(tokens).logits.numpy()
    np.testing.assert_allclose(merged, with_adapter, atol=2e-4, rtol=1e-4)
    assert np.abs(merged - plain).max() > 1e-3  # the adapter learned something


def test_a_resumed_adapter_run_continues_with_the_losses_of_an_uninterrupted_one(tiny_dir, lora_run, tmp_path):
    out, _, _ = lora_run
    resumed = str(tmp_path / "resumed")
    _run(resumed, f"model.name={tiny_dir}", "steps=2")
    result = _run(resumed, f"model.name={tiny_dir}")
    assert result.steps == 4
    np.testing.assert_allclose(_losses(resumed), _losses(out), rtol=1e-5)


def test_a_run_continues_a_peft_adapter_from_where_it_was(tiny_dir, lora_run, tmp_path):
    out, _, _ = lora_run
    notes = []
    again = str(tmp_path / "again")
    _run(again, f"model.name={tiny_dir}", f"lora.init_from={out}/adapter", "lora.rank=2", "steps=1",
         "optimizer.total_steps=2", "save_every=0", "eval_every=1", "eval_sources=[pydoc-qa]", "eval_batches=3",
         "eval_at_start=true", log=notes.append)
    assert any("continuing the adapter" in n and "rank 4" in n for n in notes)  # the adapter's rank, not 2
    evals = [line for line in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if line.get("split") == "eval"]
    start = next(line for line in map(json.loads, open(os.path.join(again, "metrics.jsonl")))
                 if line.get("split") == "eval" and line["step"] == 0)
    assert start["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)  # where the first run ended, not the base


def test_qlora_trains_an_adapter_on_the_stored_int8_base(tiny_dir, tmp_path):
    base = str(tmp_path / "int8")
    quantize_model(tiny_dir, "int8", base)
    before = _tensors(base)
    notes = []
    result = _run(str(tmp_path / "run"), f"model.name={base}", log=notes.append)
    assert result.steps == 4 and all(np.isfinite(_losses(str(tmp_path / "run"))))
    assert any(n.startswith("QLoRA on the int8 base") for n in notes)
    assert not os.path.exists(tmp_path / "run" / "hf")  # no float model: the base is integers
    after = _tensors(base)
    assert all(np.array_equal(before[k], after[k]) for k in before)
    # quantized/: the adapter merged and rounded to int8 again; nearer base + adapter than the base is.
    assert any("merged into the int8 base" in n and "not re-calibrated" in n for n in notes)
    loaded_base = pretrained.load_decoder(base)
    merged = pretrained.load_decoder(str(tmp_path / "run" / "quantized"))
    assert merged.quantization == "int8"
    adapted = lora.attach(loaded_base.params, peft_format.read(str(tmp_path / "run" / "adapter"), loaded_base.config))
    tokens = jnp.asarray([[1, 50, 700, 3000, 12, 9, 444, 31]])
    logits = {name: np.asarray(decoder.forward(tree, tokens, loaded_base.config).logits)
              for name, tree in [("base", loaded_base.params), ("adapted", adapted), ("merged", merged.params)]}
    moved = np.abs(logits["base"] - logits["adapted"]).mean()
    assert moved > 1e-4 and np.abs(logits["merged"] - logits["adapted"]).mean() < 0.5 * moved


def test_partial_fine_tuning_leaves_frozen_weights_bit_identical(tiny_dir, tmp_path):
    out = str(tmp_path / "partial")
    _run(out, f"model.name={tiny_dir}", "method=partial", "freeze=[embed, 'layers/(q|k|v|o)/.*', 'layers/.*_norm']")
    before, after = _tensors(tiny_dir), _tensors(os.path.join(out, "hf"))
    for name in before:
        frozen = "embed" in name or "self_attn" in name or "layernorm" in name  # model.norm trains
        assert np.array_equal(before[name], after[name]) == frozen, name


def test_bad_requests_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="method: partial needs freeze patterns"):
        cfg.load(FinetuneConfig, None, ["method=partial"])
    with pytest.raises(InputError, match="freeze is for method: partial"):
        cfg.load(FinetuneConfig, None, ["freeze=[embed]"])
    assert cli.main(["finetune", *SETTINGS, f"model.name={tiny_dir}", f"out={tmp_path / 'x'}",
                     "lora.targets=[layers/nope]"]) == 2
    assert "'layers/nope' matches no projection" in capsys.readouterr().err
    base = str(tmp_path / "int8")
    quantize_model(tiny_dir, "int8", base)
    assert cli.main(["finetune", *SETTINGS, f"model.name={base}", "method=full", f"out={tmp_path / 'y'}"]) == 2
    assert "use method: lora for QLoRA" in capsys.readouterr().err


def test_eval_batches_keeps_the_first_batches_of_the_held_out_documents():
    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer
    from compress.train import loop

    tokenizer = load_tokenizer(resolve("smollm2-135m-instruct"))
    config = cfg.load(FinetuneConfig, None, [*SETTINGS, "eval_sources=[pydoc-qa]"])
    every = loop._eval_batches(config, tokenizer)
    first = loop._eval_batches(dataclasses.replace(config, eval_batches=3), tokenizer)
    assert len(every) > 3 and len(first) == 3
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, every) for k in a)
    with pytest.raises(ValueError, match="eval_batches"):
        cfg.load(FinetuneConfig, None, [*SETTINGS, "eval_batches=-1"])
