"""press batch: JSONL in, JSONL out, bad lines reported with their numbers, resumable."""

import json

import pytest

from serve import cli
from serve.engine import Engine
from serve.offline import run_batch
from serve.sampling import SamplingParams

pytestmark = pytest.mark.slow

GOOD = [
    {"id": "a", "prompt": "The capital of France is"},
    {"id": 2, "messages": [{"role": "user", "content": "Name a colour."}]},
    {"id": "c", "prompt": "Once upon a time", "sampling": {"max_new_tokens": 5, "temperature": 0.8, "seed": 3}},
    {"id": "d", "prompt": "def add(a, b):", "sampling": {"stop": ["\n"]}},
]
BAD = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"prompt": "no id"}', "needs an 'id'"),
    ('{"id": "e"}', "exactly one of 'prompt'"),
    ('{"id": "f", "prompt": "x", "messages": []}', "exactly one of 'prompt'"),
    ('{"id": "g", "prompt": "x", "sampling": {"temprature": 1}}', "unknown sampling field"),
    ('{"id": "h", "prompt": "x", "sampling": {"top_p": 3}}', "top_p"),
    ('{"id": "a", "prompt": "again"}', "duplicate id"),
    ('{"id": "long", "prompt": "' + "word " * 300 + '"}', "context"),
]
DEFAULTS = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=4, max_seq_len=256) as e:
        yield e


def _write_input(path):
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1]), ""]
    lines += [b for b, _ in BAD[:4]] + [json.dumps(GOOD[2])] + [b for b, _ in BAD[4:]] + [json.dumps(GOOD[3])]
    path.write_text("\n".join(lines) + "\n")
    return lines


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batch_job_outputs_errors_and_counts(engine, tmp_path):
    lines = _write_input(tmp_path / "in.jsonl")
    out, errs = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    summary = run_batch(engine, str(tmp_path / "in.jsonl"), str(out), defaults=DEFAULTS, progress=False)
    assert summary["lines"] == len(lines)
    assert (summary["ok"], summary["errors"], summary["blank"], summary["skipped"]) == (4, len(BAD), 1, 0)

    results = {r["id"]: r for r in _read(out)}
    assert set(results) == {"a", 2, "c", "d"}
    want = engine.generate(["The capital of France is", GOOD[1]["messages"]], DEFAULTS)
    assert results["a"]["text"] == want[0].text and results["a"]["token_ids"] == want[0].token_ids
    assert results[2]["text"] == want[1].text
    assert results["c"]["completion_tokens"] <= 5
    assert "\n" not in results["d"]["text"]
    for r in results.values():
        assert r["completion_tokens"] == len(r["token_ids"]) and r["prompt_tokens"] > 0 and r["finish_reason"]

    errors = _read(errs)
    numbered = {line: i + 1 for i, line in enumerate(lines)}
    assert [e["line"] for e in errors] == sorted(numbered[b] for b, _ in BAD)
    for e, (bad, expected) in zip(errors, sorted(BAD, key=lambda b: numbered[b[0]])):
        assert expected in e["error"], (bad, e)


def test_rerun_skips_done_ids_and_repairs_a_torn_line(engine, tmp_path):
    _write_input(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    run_batch(engine, str(tmp_path / "in.jsonl"), str(out), defaults=DEFAULTS, progress=False)
    first = _read(out)
    # A killed run: the last result line is half written.
    kept = out.read_text().splitlines(keepends=True)
    out.write_text("".join(kept[:-1]) + kept[-1][:10])
    summary = run_batch(engine, str(tmp_path / "in.jsonl"), str(out), defaults=DEFAULTS, progress=False)
    assert summary["ok"] == 1 and summary["skipped"] == 3
    again = _read(out)
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, first))
    summary = run_batch(engine, str(tmp_path / "in.jsonl"), str(out), defaults=DEFAULTS, progress=False)
    assert summary["ok"] == 0 and summary["skipped"] == 4 and summary["generated_tokens"] == 0


def test_press_batch_command(tmp_path, capsys):
    (tmp_path / "in.jsonl").write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n")
    argv = ["batch", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "6", "--max-slots", "2",
            "--max-seq-len", "128", "--no-progress"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["ok"] == 2 and summary["tokens_per_second"] > 0
    assert len(_read(tmp_path / "out.jsonl")) == 2
    assert cli.main(["batch", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "missing.jsonl"),
                     "--output", str(tmp_path / "o.jsonl")]) == 2
