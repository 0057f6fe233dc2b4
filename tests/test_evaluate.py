"""press eval: perplexity equals transformers' exp(mean NLL), agreement, bytes, speed, the table and the plot."""

import io
import json
import math
import os

import numpy as np
import pytest

from compress.data import corpus
from compress.eval import perplexity, report
from compress.commands.quantize import quantize_model
from compress.formats.registry import resolve
from compress.formats.tokenizer import load_tokenizer
from serve import cli
from tests.reference import hf_logits
from tests.tiny_decoder import export_tiny_decoder

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--decode-tokens", "0"]  # the decode-speed run only where a test checks it


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve("smollm2-135m-instruct"))  # the bundled SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tokenizer, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, exported as a Hugging Face directory."""
    return export_tiny_decoder(str(tmp_path_factory.mktemp("eval") / "tiny-float"), with_eos=True,
                               tie_word_embeddings=True)


@pytest.fixture(scope="module")
def int8_dir(tiny_dir):
    out = os.path.join(os.path.dirname(tiny_dir), "tiny-int8")
    quantize_model(tiny_dir, "int8", out)
    return out


def _reference_perplexity(model, ids, windows: int, window: int) -> float:
    """exp(mean NLL) by a transformers (PyTorch) model over the first `windows` windows of `window` ids."""
    import torch

    tokens = np.asarray(ids[: windows * window]).reshape(windows, window)
    logp = torch.log_softmax(torch.from_numpy(hf_logits(model, tokens)[:, :-1]).double(), dim=-1)
    nll = -logp.gather(-1, torch.from_numpy(tokens[:, 1:, None]).long())
    return math.exp(float(nll.mean()))


def _transformers_perplexity(model_dir: str, text: str, windows: int, window: int) -> float:
    """_reference_perplexity of a Hugging Face directory, tokenized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return _reference_perplexity(model, ids, windows, window)


def _eval_json(capsys, *argv) -> list[dict]:
    assert cli.main(["eval", *argv, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_pydoc_split_holds_out_every_fifth_sorted_topic_and_is_stable():
    from pydoc_data.topics import topics

    train, held_out = corpus.pydoc_split()
    assert corpus.pydoc_split() == (train, held_out)
    names = sorted(topics)
    for i, name in enumerate(names):  # each topic in exactly one part (the long ones are unique)
        if len(topics[name]) > 2000:
            assert (topics[name] in held_out) == (i % 5 == 0) and (topics[name] in train) == (i % 5 != 0), name
    assert len(held_out) < len(train) / 2


def test_perplexity_equals_transformers_on_the_held_out_text(tiny_dir, capsys):
    # 3 windows in batches of 2: the padded last batch must not change the figure.
    [got] = _eval_json(capsys, "--model", tiny_dir, "--windows", "3", "--window", "32", "--batch", "2", *FAST)
    want = _transformers_perplexity(tiny_dir, corpus.pydoc_split()[1], 3, 32)
    assert got["perplexity"] == pytest.approx(want, rel=1e-4)
    assert got["windows"] == 3 and got["agreement"] is None and got["decode_tokens_per_second"] is None
    assert got["data"] == corpus.PYDOC_HELD_OUT_SOURCE


def test_data_takes_any_text_file(tiny_dir, tmp_path, capsys):
    text = "A small corpus for press eval: the quick brown fox jumps over the lazy dog. " * 20
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    [got] = _eval_json(capsys, "--model", tiny_dir, "--data", str(path), "--windows", "4", "--window", "24", *FAST)
    assert got["data"] == str(path) and got["windows"] == 4
    assert got["perplexity"] == pytest.approx(_transformers_perplexity(tiny_dir, text, 4, 24), rel=1e-4)


def test_missing_file_and_too_short_text_fail_saying_why(tiny_dir, tokenizer, tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    assert cli.main(["eval", "--model", tiny_dir, "--data", str(missing)]) == 2
    assert f"press eval: error: {missing}: no such text file" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill a window.", encoding="utf-8")
    count = len(tokenizer(short.read_text())["input_ids"])
    assert cli.main(["eval", "--model", tiny_dir, "--data", str(short), "--window", "64", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{short}: the text is {count} tokens, fewer than one window of 64" in err
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert cli.main(["eval", "--model", tiny_dir, "--data", str(latin1)]) == 2
    assert f"{latin1}: not UTF-8 text" in capsys.readouterr().err


def test_config_and_flags_are_checked_before_any_work(capsys):
    with pytest.raises(ValueError, match="EvalConfig.window must be an integer >= 2, got 1"):
        perplexity.EvalConfig(window=1)
    not_loaded = "no/such/model"  # each check fails before a model would be loaded
    assert cli.main(["eval", "--compare", not_loaded]) == 2
    assert "--compare needs two or more models; use --model for one" in capsys.readouterr().err
    assert cli.main(["eval", "--compare", not_loaded, not_loaded, "--plot", "plot.svg"]) == 2
    assert "give a path ending in .png" in capsys.readouterr().err
    assert cli.main(["eval", "--model", not_loaded, "--windows", "0"]) == 2
    assert "EvalConfig.windows must be an integer >= 1, got 0" in capsys.readouterr().err


def test_compare_float_and_int8_prints_a_table_writes_a_plot_and_json(tiny_dir, int8_dir, tmp_path, capsys):
    plot = tmp_path / "plots" / "compare.png"
    float_row, int8_row = _eval_json(capsys, "--compare", tiny_dir, int8_dir, "--windows", "2", "--window", "32",
                                     "--decode-tokens", "16", "--plot", str(plot))
    assert plot.read_bytes().startswith(PNG_SIGNATURE) and plot.stat().st_size > 1000
    assert [float_row["model"], int8_row["model"]] == [tiny_dir, int8_dir]
    assert float_row["quantization"] is None and int8_row["quantization"] == "int8"
    assert float_row["reference"] == int8_row["reference"] == tiny_dir
    assert float_row["agreement"] == 1.0 and 0.5 < int8_row["agreement"] <= 1.0
    assert int8_row["bytes"] < float_row["bytes"]
    assert float_row["bf16_bytes"] == int8_row["bf16_bytes"] == float_row["bytes"] // 2  # float32 = 2 x bf16
    assert float_row["decode_tokens_per_second"] > 0 and int8_row["decode_tokens_per_second"] > 0
    assert int8_row["perplexity"] == pytest.approx(float_row["perplexity"], rel=0.05)

    # --model with --reference gives the same agreement as --compare did.
    [alone] = _eval_json(capsys, "--model", int8_dir, "--reference", tiny_dir, "--windows", "2", "--window", "32", *FAST)
    assert alone["agreement"] == int8_row["agreement"] and alone["perplexity"] == int8_row["perplexity"]

    # The table: one row per model, with the figures of the JSON (which reads back as ModelEval).
    out = io.StringIO()
    report.print_table([perplexity.ModelEval(**{k: v for k, v in row.items() if k != "fraction_of_bf16"})
                          for row in (float_row, int8_row)], out)
    table = out.getvalue()
    assert "perplexity" in table and "top-1 agree" in table
    rows = [line for line in table.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and rows[0].split("│")[1].strip() == "tiny-float" and "100.0%" in rows[0]
    assert f"{float_row['perplexity']:.3f}" in rows[0] and f"{int8_row['perplexity']:.3f}" in rows[1]
    assert rows[1].split("│")[2].strip() == "int8"


@pytest.mark.slow
def test_real_smollm2_perplexity_equals_transformers_on_its_gguf(capsys):
    import torch
    from transformers import AutoModelForCausalLM

    [got] = _eval_json(capsys, "--model", "smollm2-135m-instruct", "--windows", "2", "--window", "128", *FAST)
    path = resolve("smollm2-135m-instruct").path
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32).eval()
    ids = load_tokenizer(resolve("smollm2-135m-instruct"))(corpus.pydoc_split()[1])["input_ids"]
    want = _reference_perplexity(ref, ids, 2, 128)
    assert got["perplexity"] == pytest.approx(want, rel=1e-3)
    assert got["bytes"] == 2 * got["bf16_bytes"]  # float32 in memory


def test_a_kv_int8_model_is_scored_through_its_int8_cache(tiny_dir, tmp_path, capsys):
    kv_dir = str(tmp_path / "tiny-kv")
    quantize_model(tiny_dir, "kv-int8", kv_dir)  # float weights, int8 cache
    float_row, kv_row = _eval_json(capsys, "--compare", tiny_dir, kv_dir, "--windows", "2", "--window", "32", *FAST,
                                   "--plot", str(tmp_path / "kv.png"))
    # The cache's rounding shows in the scores (so eval measures what serving computes) and stays small.
    assert kv_row["quantization"] == "kv-int8" and kv_row["bytes"] == float_row["bytes"]
    assert kv_row["perplexity"] != float_row["perplexity"]
    assert kv_row["perplexity"] == pytest.approx(float_row["perplexity"], rel=0.01) and kv_row["agreement"] > 0.9


def test_the_plot_places_labels_of_same_size_models_without_looping(tmp_path):
    """Students of one size whose labels stack: a label moved to py + gap reads as nearer than
    gap to py once rounded, which used to loop forever (found plotting four students)."""
    import signal

    def row(model, ppl, size):
        return perplexity.ModelEval(model, None, ppl, None, None, size, size, None, 33, 512, "held-out")

    rows = [row("teacher", 10.958620295138639, 538_100_000), row("kd-t1", 21.66045966349652, 268_200_000),
            row("kd-mix", 18.125797676575935, 268_200_000), row("kd-mix-hid", 17.99736796786383, 268_200_000),
            row("ce", 18.66994428543091, 268_200_000)]

    def stuck(*_):
        raise TimeoutError("write_plot did not finish")

    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(30)
    try:
        report.write_plot(rows, str(tmp_path / "students.png"))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert os.path.getsize(tmp_path / "students.png") > 10_000
    # a run's export is named by its run, not "hf" five times
    assert [report.label(p) for p in ("out/w/kd-mix/hf", "out/q8", "smollm2-135m-instruct")] == \
        ["kd-mix/hf", "q8", "smollm2-135m-instruct"]
