"""press batch on the real SmolLM2: results equal engine.generate, bad lines numbered, resumable."""

import dataclasses
import json
import shutil

import pytest

from serve import batch, cli
from serve.engine import Engine
from serve.sampling import SamplingParams

pytestmark = pytest.mark.slow

DEFAULTS = SamplingParams(max_new_tokens=6)
GOOD = [  # mixed prompt / messages lines, with per-line overrides (greedy, stop, seeded sampling)
    {"id": "a", "prompt": "The capital of France is"},
    {"id": 2, "messages": [{"role": "user", "content": "Name a colour."}], "sampling": {"max_new_tokens": 4}},
    {"id": "c", "prompt": "Once upon a time", "sampling": {"temperature": 0.8, "top_k": 20, "seed": 3}},
    {"id": "d", "prompt": "def add(a, b):", "sampling": {"stop": ["\n"], "max_new_tokens": 8}},
]
BAD = [  # (raw line, expected id in the errors file, expected words in its message)
    (b"{not json", None, "not valid JSON"),
    (b'{"id": "u", "prompt": "caf\xff"}', None, "UTF-8"),
    (b'["a list"]', None, "expected a JSON object"),
    (b'{"prompt": "no id"}', None, "needs an 'id'"),
    (b'{"id": true, "prompt": "x"}', None, "needs an 'id'"),
    (b'{"id": "e"}', "e", "exactly one of 'prompt'"),
    (b'{"id": "f", "prompt": "x", "messages": []}', "f", "exactly one of 'prompt'"),
    (b'{"id": "g", "messages": [1, 2]}', "g", "'messages' must be"),
    (b'{"id": "h", "messages": [{"role": "user"}]}', "h", "needs string 'role' and 'content'"),
    (b'{"id": "i", "prompt": "x", "sampling": {"temprature": 1}}', "i", "unknown sampling field"),
    (b'{"id": "j", "prompt": "x", "sampling": {"top_p": 3}}', "j", "top_p"),
    (b'{"id": "k", "prompt": "x", "sampling": {"ignore_eos": "yes"}}', "k", "ignore_eos"),
    (b'{"id": "l", "prompt": "x", "sampling": {"max_new_tokens": 0}}', "l", "max_new_tokens"),
    (b'{"id": "a", "prompt": "again"}', "a", "duplicate id 'a' (first on line 1)"),
    (b'{"id": "long", "prompt": "' + b"word " * 300 + b'"}', "long", "context"),
]


def _dumps(obj) -> bytes:
    return json.dumps(obj).encode()


# Good and bad lines interleaved, one blank line among them.
LINES = [_dumps(GOOD[0]), _dumps(GOOD[1]), b""] + [raw for raw, _, _ in BAD[:7]] + [_dumps(GOOD[2])]
LINES += [raw for raw, _, _ in BAD[7:]] + [_dumps(GOOD[3])]


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=4, max_seq_len=256) as e:
        yield e


@pytest.fixture(scope="module")
def job(engine, tmp_path_factory):
    """The mixed job run once: (directory, summary)."""
    root = tmp_path_factory.mktemp("job")
    (root / "in.jsonl").write_bytes(b"\n".join(LINES) + b"\n")
    summary = batch.run_batch(engine, str(root / "in.jsonl"), str(root / "out.jsonl"), defaults=DEFAULTS,
                              progress=False)
    return root, summary


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompt(line):
    return line.get("prompt") or line["messages"]


def test_results_equal_engine_generate(engine, job):
    root, summary = job
    results = {r["id"]: r for r in _read(root / "out.jsonl")}
    assert set(results) == {"a", 2, "c", "d"}
    params = [dataclasses.replace(DEFAULTS, **g.get("sampling", {})) for g in GOOD]
    want = engine.generate([_prompt(g) for g in GOOD], params)
    for line, expected in zip(GOOD, want):
        got = results[line["id"]]
        assert got["text"] == expected.text and got["token_ids"] == expected.token_ids, line
        assert got["prompt_tokens"] == len(expected.prompt_token_ids)
        assert got["finish_reason"] == expected.finish_reason
        assert got["completion_tokens"] == len(got["token_ids"]) <= params[GOOD.index(line)].max_new_tokens
    assert results[2]["completion_tokens"] <= 4 and "\n" not in results["d"]["text"]
    assert summary["generated_tokens"] == sum(r["completion_tokens"] for r in results.values())


def test_every_bad_kind_is_numbered_in_the_errors_file(job):
    root, summary = job
    errors = _read(root / "out.errors.jsonl")
    numbers = {raw: i for i, raw in enumerate(LINES, 1)}
    assert [e["line"] for e in errors] == sorted(numbers[raw] for raw, _, _ in BAD)
    for e, (raw, line_id, words) in zip(errors, sorted(BAD, key=lambda b: numbers[b[0]])):
        assert words in e["error"] and e["id"] == line_id, (raw, e)


def test_counts_add_up_to_the_lines(job):
    _, s = job
    assert (s["lines"], s["ok"], s["skipped"], s["errors"], s["blank"]) == (len(LINES), 4, 0, len(BAD), 1)
    assert s["ok"] + s["skipped"] + s["errors"] + s["blank"] == s["lines"]
    assert s["requests"] == 4 and s["tokens_per_second"] > 0 and s["requests_per_second"] > 0


def test_rerun_skips_done_ids_and_repairs_a_torn_last_line(engine, job, tmp_path):
    root, _ = job
    for name in ("in.jsonl", "out.jsonl", "out.errors.jsonl"):
        shutil.copy(root / name, tmp_path / name)
    first_out, first_errors = (tmp_path / "out.jsonl").read_bytes(), (tmp_path / "out.errors.jsonl").read_bytes()
    args = (engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))

    generated = engine.stats["generated_tokens"]
    s = batch.run_batch(*args, defaults=DEFAULTS, progress=False)
    assert (s["ok"], s["skipped"], s["errors"], s["requests"], s["generated_tokens"]) == (0, 4, len(BAD), 0, 0)
    assert engine.stats["generated_tokens"] == generated  # nothing went to the engine
    assert (tmp_path / "out.jsonl").read_bytes() == first_out
    assert (tmp_path / "out.errors.jsonl").read_bytes() == first_errors  # rewritten, not appended to

    # A killed run: the last result line is half written.
    kept = first_out.splitlines(keepends=True)
    (tmp_path / "out.jsonl").write_bytes(b"".join(kept[:-1]) + kept[-1][:15])
    s = batch.run_batch(*args, defaults=DEFAULTS, progress=False)
    assert (s["ok"], s["skipped"], s["requests"]) == (1, 3, 1)
    assert s["ok"] + s["skipped"] + s["errors"] + s["blank"] == s["lines"]
    again = (tmp_path / "out.jsonl").read_bytes()
    assert sorted(again.splitlines()) == sorted(first_out.splitlines())  # greedy and seeded: the same line


class _CountingEngine:
    """The engine, recording the most requests of this job it ever had unfinished at once."""

    def __init__(self, engine):
        self.engine, self.max_slots, self.submitted, self.most = engine, engine.max_slots, [], 0

    def submit(self, *args, **kwargs):
        self.submitted.append(self.engine.submit(*args, **kwargs))
        self.most = max(self.most, sum(not r.done for r in self.submitted))
        return self.submitted[-1]


def test_window_bounds_requests_and_results_come_in_completion_order(engine, tmp_path):
    long = {"id": "long", "prompt": "Count to fifty:", "sampling": {"max_new_tokens": 40, "ignore_eos": True}}
    short = [{"id": f"s{i}", "prompt": f"Say {i}.", "sampling": {"max_new_tokens": 2}} for i in range(6)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in [long, *short]) + "\n")
    counting = _CountingEngine(engine)
    s = batch.run_batch(counting, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), defaults=DEFAULTS,
                        progress=False, window=3)
    assert s["ok"] == 7 and counting.most <= 3
    ids = [r["id"] for r in _read(tmp_path / "out.jsonl")]
    assert ids[-1] == "long" and sorted(ids[:-1]) == [x["id"] for x in short]  # short ones did not wait for it
    assert _read(tmp_path / "out.jsonl")[-1]["completion_tokens"] == 40


def test_shard_takes_every_nth_line(engine, tmp_path):
    lines = [{"id": i, "prompt": f"Number {i}", "sampling": {"max_new_tokens": 1}} for i in range(1, 6)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    s = batch.run_batch(engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), defaults=DEFAULTS,
                        progress=False, shard=(1, 2))
    assert s["lines"] == 3 and sorted(r["id"] for r in _read(tmp_path / "out.jsonl")) == [1, 3, 5]


def test_press_batch_command_on_all_local_devices(engine, tmp_path, capsys):
    """The CLI: a data-parallel engine over the 8 simulated devices, progress bar, exit status 1 for a bad line."""
    good = [{"id": "a", "prompt": "The capital of France is"}, {"id": "b", "prompt": "Water boils at"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in good) + "\n{bad\n")
    assert cli.main([
        "batch", "--model", "smollm2-135m-instruct", "--input", str(tmp_path / "in.jsonl"), "--output",
        str(tmp_path / "out.jsonl"), "--max-new-tokens", "5", "--max-slots", "2", "--max-seq-len", "64",
        "--stop", "zzz", "yyy",
    ]) == 1
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert (summary["ok"], summary["errors"], summary["lines"]) == (2, 1, 3)
    assert "rounded up to 8" in captured.err and "tokens/s" in captured.err
    results = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
    want = engine.generate([g["prompt"] for g in good], SamplingParams(max_new_tokens=5, stop=("zzz", "yyy")))
    assert [results[g["id"]]["token_ids"] for g in good] == [w.token_ids for w in want]  # sharded == one device
    assert _read(tmp_path / "out.errors.jsonl")[0]["line"] == 3
