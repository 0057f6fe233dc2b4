"""press batch isolates every line: whatever one line does (lone surrogates, bytes that are not
UTF-8, a tokenizer or engine failure, a result that cannot be written), the others are written,
it is numbered in the errors file, and a rerun retries only it. On the real SmolLM2."""

import dataclasses
import io
import json

import pytest

from serve import batch, cli
from serve.engine import Engine, RequestOutput
from serve.sampling import SamplingParams

pytestmark = pytest.mark.slow

DEFAULTS = SamplingParams(max_new_tokens=3)
TOPICS = ["rain", "bread", "a river", "the moon", "chess", "a violin", "snow", "coffee", "a bridge", "bees"]
GOOD = [{"id": f"p{i}", "prompt": f"One fact about {t}:"} for i, t in enumerate(TOPICS)]
GOOD += [{"id": i, "messages": [{"role": "user", "content": f"Describe {t} in one word."}]}
         for i, t in enumerate(TOPICS)]
GOOD[3]["sampling"] = {"stop": [" the"], "max_new_tokens": 5}
BAD = [  # (raw line, id in the errors file, words of its message)
    (rb'{"id": "sp", "prompt": "a\ud800b"}', "sp", "'prompt' holds a lone surrogate (U+D800 at character 1)"),
    (rb'{"id": "sm", "messages": [{"role": "user", "content": "hi \udfff"}]}', "sm",
     "'messages[0].content' holds a lone surrogate (U+DFFF at character 3)"),
    (rb'{"id": "x\ud800", "prompt": "a fine prompt"}', "x\ud800", "'id' holds a lone surrogate (U+D800"),
    (rb'{"id": "ss", "prompt": "fine", "sampling": {"stop": ["ok", "\ud83d"]}}', "ss",
     "'sampling.stop[1]' holds a lone surrogate"),
    (b'{"id": "b8", "prompt": "caf\xe9 au lait"}', None, "not valid UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),  # RecursionError in json, not a ValueError
    (b'{"id": "tk", "prompt": "fine", "sampling": {"top_k": 1099511627776}}', "tk", "top_k must be an integer in [0, 2**31)"),
]
# The bad lines among the good ones; line numbers are 1-based.
LINES = [json.dumps(g).encode() for g in GOOD]
for position, (raw, _, _) in zip((0, 4, 7, 11, 15, 20, 22), BAD):
    LINES.insert(position, raw)
NUMBERS = [LINES.index(raw) + 1 for raw, _, _ in BAD]


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("smollm2-135m-instruct", max_slots=4, max_seq_len=256) as e:
        yield e


class _Borrowed:
    """The module's engine handed to `press batch` (which would load and close its own)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _press_batch(engine, monkeypatch, capsys, root, *settings: str) -> tuple[int, dict]:
    """`press batch` on root/in.jsonl with the module's engine: (exit status, summary)."""
    monkeypatch.setattr(Engine, "from_pretrained", lambda *args, **kwargs: _Borrowed(engine))
    status = cli.main(["batch", "--model", "smollm2-135m-instruct", "--input", str(root / "in.jsonl"),
                       "--output", str(root / "out.jsonl"), "--max-new-tokens", str(DEFAULTS.max_new_tokens),
                       "--no-progress", *settings])
    return status, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _read(path):
    """JSON lines of a file that must be valid UTF-8."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


def test_bad_lines_never_stop_the_job_and_a_rerun_lists_them_again(engine, tmp_path, monkeypatch, capsys):
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(LINES) + b"\n")
    status, s = _press_batch(engine, monkeypatch, capsys, tmp_path)
    assert status == 1
    assert (s["lines"], s["ok"], s["errors"], s["requests"]) == (len(LINES), len(GOOD), len(BAD), len(GOOD))

    results = {r["id"]: r for r in _read(tmp_path / "out.jsonl")}
    want = engine.generate([g.get("prompt") or g["messages"] for g in GOOD],
                           [dataclasses.replace(DEFAULTS, **g.get("sampling", {})) for g in GOOD])
    assert set(results) == {g["id"] for g in GOOD}
    for line, expected in zip(GOOD, want):
        got = results[line["id"]]
        assert (got["text"], got["token_ids"], got["finish_reason"]) == \
            (expected.text, expected.token_ids, expected.finish_reason), line

    raw_errors = (tmp_path / "out.errors.jsonl").read_bytes()
    errors = _read(tmp_path / "out.errors.jsonl")
    assert [e["line"] for e in errors] == sorted(NUMBERS)
    for number, (raw, line_id, words) in sorted(zip(NUMBERS, BAD)):
        e = next(e for e in errors if e["line"] == number)
        assert e["id"] == line_id and words in e["error"], (raw[:80], e)
    assert b'"id": "x\\ud800"' in raw_errors  # the id as the input spelled it, escaped

    generated, out = engine.stats["generated_tokens"], (tmp_path / "out.jsonl").read_bytes()
    status, s = _press_batch(engine, monkeypatch, capsys, tmp_path)
    assert status == 1 and (s["ok"], s["skipped"], s["errors"], s["requests"]) == (0, len(GOOD), len(BAD), 0)
    assert engine.stats["generated_tokens"] == generated
    assert (tmp_path / "out.jsonl").read_bytes() == out
    assert (tmp_path / "out.errors.jsonl").read_bytes() == raw_errors


class _Finished:
    """A request the engine has already ended with this output."""

    def __init__(self, output: RequestOutput):
        self.output, self.token_ids, self.done = output, output.token_ids, True

    def result(self, timeout=None):
        return self.output

    def cancel(self):
        pass


class _FaultyEngine:
    """The real engine, except for prompts naming a fault: the faults an engine shows one request.

    'raise T': submit raises T in the caller's thread (the tokenizer failing, any type);
    'fail': the request ends with finish_reason 'error' (the scheduler failing it later);
    'cancel': the real request, cancelled meanwhile; 'surrogate': a result whose text holds a
    lone surrogate. `fixed` turns every fault off.
    """

    def __init__(self, engine):
        self.engine, self.max_slots, self.fixed, self.prompts = engine, engine.max_slots, False, []

    def submit(self, prompt, params, request_id):
        self.prompts.append(prompt)
        fault = "" if self.fixed else prompt.split(":")[0]
        if fault.startswith("raise "):
            raise {"raise TypeError": TypeError, "raise KeyError": KeyError}[fault]("tokenizer exploded")
        if fault == "fail":
            return _Finished(RequestOutput(request_id, [1], "", [], "error", "engine error: XlaRuntimeError: oom"))
        if fault == "surrogate":
            return _Finished(RequestOutput(request_id, [1], "half \udc80", [2], "length"))
        request = self.engine.submit(prompt, params, request_id=request_id)
        if fault == "cancel":
            request.cancel()
        return request


def test_engine_faults_stay_on_their_line_and_a_rerun_retries_only_them(engine, tmp_path):
    faults = {"raise TypeError": "TypeError: tokenizer exploded", "raise KeyError": "KeyError: 'tokenizer exploded'",
              "fail": "engine: engine error: XlaRuntimeError: oom", "cancel": "engine: cancelled",
              "surrogate": "cannot be written as UTF-8 JSON: UnicodeEncodeError"}
    good = [f"Say {word}." for word in ("yes", "no", "maybe")]
    prompts = [f"{fault}: say hi." for fault in faults] + good
    lines = [{"id": i, "prompt": p} for i, p in enumerate(prompts, 1)]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    faulty = _FaultyEngine(engine)
    args = (faulty, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"))

    s = batch.run_batch(*args, defaults=DEFAULTS, progress=False)
    assert (s["ok"], s["errors"]) == (len(good), len(faults))
    errors = _read(tmp_path / "out.errors.jsonl")
    assert sorted((e["line"], e["id"]) for e in errors) == [(i, i) for i in range(1, len(faults) + 1)]
    for e in errors:
        assert faults[prompts[e["line"] - 1].split(":")[0]] in e["error"], e
    want = engine.generate(good, DEFAULTS)
    assert {r["id"]: r["token_ids"] for r in _read(tmp_path / "out.jsonl")} == \
        {len(faults) + i: w.token_ids for i, w in enumerate(want, 1)}

    faulty.fixed, faulty.prompts = True, []
    s = batch.run_batch(*args, defaults=DEFAULTS, progress=False)
    assert faulty.prompts == prompts[: len(faults)]  # only the failed lines went to the engine again
    assert (s["ok"], s["skipped"], s["errors"]) == (len(faults), len(good), 0)
    assert (tmp_path / "out.errors.jsonl").read_bytes() == b""
    assert sorted(r["id"] for r in _read(tmp_path / "out.jsonl")) == [x["id"] for x in lines]


class _Reads(io.BytesIO):
    """A binary file that records the longest piece any one readline returned."""

    longest = 0

    def readline(self, size=-1):
        piece = super().readline(size)
        self.longest = max(self.longest, len(piece))
        return piece


@pytest.mark.parametrize("limit", [1, 5, 6, 7, 64])
def test_bounded_lines_never_hold_more_than_the_limit(limit):
    lines = [b"", b"a", b"abcde", b"abcdef", b"x" * 200, b"", b"tail" * 3]
    for end in (b"\n", b""):  # the last line with and without its newline
        data = b"\n".join(lines) + end
        f = _Reads(data)
        got = list(batch.bounded_lines(f, limit))
        want = [(n, raw, len(raw)) for n, raw in enumerate(data.splitlines(keepends=True), 1)]
        assert [(n, size) for n, _, size in got] == [(n, size) for n, _, size in want]
        for (_, raw, _), (_, whole, _) in zip(got, want):
            assert raw == (whole if len(whole.rstrip(b"\n")) <= limit else None)
        assert f.longest <= max(limit + 1, batch.SKIP_BYTES)


def test_a_line_beyond_the_limit_is_an_error_and_never_read_whole(engine, tmp_path, monkeypatch, capsys):
    """A line of gigabytes would take the job's memory, and every rerun's: beyond max_line_bytes it
    goes to the errors file unread, the lines after it run, and the last line may be one too."""
    huge = json.dumps({"id": "huge", "prompt": "Say maybe.", "note": "x" * 10_000}).encode()  # 10 kB; press batch ignores other keys
    good = [{"id": "before", "prompt": "Say yes."}, {"id": "after", "prompt": "Say no."}]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join([json.dumps(good[0]).encode(), huge, json.dumps(good[1]).encode(),
                                                    huge.replace(b"huge", b"last")]))
    status, s = _press_batch(engine, monkeypatch, capsys, tmp_path, "max_line_bytes=4096")
    assert status == 1 and (s["lines"], s["ok"], s["errors"], s["requests"]) == (4, 2, 2, 2)
    assert sorted(r["id"] for r in _read(tmp_path / "out.jsonl")) == ["after", "before"]
    errors = _read(tmp_path / "out.errors.jsonl")
    assert [(e["line"], e["id"]) for e in errors] == [(2, None), (4, None)]
    assert errors[0]["error"] == (f"the line is {len(huge) + 1} bytes, beyond the limit of 4096 (max_line_bytes); "
                                  "it was not read")
    assert f"the line is {len(huge)} bytes" in errors[1]["error"]  # the last line, without a newline

    status, s = _press_batch(engine, monkeypatch, capsys, tmp_path, "max_line_bytes=16384")  # a higher limit
    assert status == 0 and (s["ok"], s["skipped"], s["errors"]) == (2, 2, 0)
