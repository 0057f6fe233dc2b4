"""Multi-host press batch: two processes on localhost (jax.distributed, CPU collectives) leave one
output with exactly the lines of a single-process run; the merge of their parts resumes if killed."""

import json
import os

import pytest

from compress.config import ConfigError
from compress.errors import InputError
from serve import batch
from serve.commands.batch import BatchConfig
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.devices import xla_flags
from tests.processes import run_job

DEFAULTS = SamplingParams(max_new_tokens=4)
ENGINE = {"max_slots": 1, "max_seq_len": 64}  # one row: a request's numbers do not depend on its neighbours
LINES = [json.dumps({"id": i, "prompt": f"Item number {i} is"}).encode() for i in range(10)]
LINES[3:3] = [b"{not json"]  # line 4
LINES[5:5] = [json.dumps({"id": 2, "prompt": "again"}).encode()]  # line 6 (process 0) repeats line 3's id (process 1)
LINES[8:8] = [json.dumps({"id": 1, "prompt": "and again"}).encode()]  # line 9 (process 1) repeats line 2's id


def _write_lines(path, lines) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def _read(path):
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_engine(tiny_chat_dir):
    with Engine.from_pretrained(tiny_chat_dir, **ENGINE) as e:
        yield e


@pytest.mark.slow
def test_two_processes_leave_the_output_of_one(tiny_chat_dir, tiny_engine, tmp_path):
    _write_lines(tmp_path / "in.jsonl", LINES)
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}  # one device; the rest as conftest set it
    codes, logs = run_job(["batch", "--model", tiny_chat_dir, "--input", str(tmp_path / "in.jsonl"),
                           "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", str(DEFAULTS.max_new_tokens),
                           "--max-slots", str(ENGINE["max_slots"]), "--max-seq-len", str(ENGINE["max_seq_len"]),
                           "--no-progress"], 2, env)
    assert codes == [1, 1], logs  # 1: some lines are in the errors file
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.errors.jsonl", "out.jsonl"]  # the parts are gone

    single = batch.run_batch(tiny_engine, str(tmp_path / "in.jsonl"), str(tmp_path / "single.jsonl"),
                             defaults=DEFAULTS, progress=False)
    merged = _read(tmp_path / "out.jsonl")
    assert len(merged) == single["ok"] == 10
    assert sorted(merged, key=lambda r: r["id"]) == sorted(_read(tmp_path / "single.jsonl"), key=lambda r: r["id"])
    errors = _read(tmp_path / "out.errors.jsonl")
    assert errors == _read(tmp_path / "single.errors.jsonl")  # the same lines, by line number
    assert [(e["line"], e["id"]) for e in errors] == [(4, None), (6, 2), (9, 1)]
    assert "duplicate id 2 (first on line 3)" in errors[1]["error"]  # line 3 was the other process's
    assert "duplicate id 1 (first on line 2)" in errors[2]["error"]

    summary = json.loads(logs[0].strip().splitlines()[-1])
    counts = ("lines", "blank", "skipped", "ok", "errors", "requests", "generated_tokens")
    assert {k: summary[k] for k in counts} == {k: single[k] for k in counts} and summary["processes"] == 2


@pytest.mark.slow
def test_a_process_skips_ids_in_the_merged_output_and_leaves_that_file_alone(tiny_engine, tmp_path):
    _write_lines(tmp_path / "in.jsonl", LINES)
    merged = b'{"id": 1, "text": "x", "token_ids": [5]}\n{"id": 7, "te'  # a merge killed mid-line
    (tmp_path / "out.jsonl").write_bytes(merged)
    part = str(tmp_path / "out.jsonl.part1")
    s = batch.run_batch(tiny_engine, str(tmp_path / "in.jsonl"), part, str(tmp_path / "out.errors.jsonl.part1"),
                        DEFAULTS, progress=False, shard=(1, 2), done_in=(str(tmp_path / "out.jsonl"),))
    # Process 1's lines 1, 3, 5, 7, 9, 11, 13: ids 0, 2, 3, 4, 1 (line 2's), 7, 9.
    assert (s["lines"], s["skipped"], s["errors"], s["ok"]) == (7, 0, 1, 6)
    assert 7 in {r["id"] for r in _read(tmp_path / "out.jsonl.part1")}  # torn off the merged output: it runs
    assert (tmp_path / "out.jsonl").read_bytes() == merged  # another process's file: read, never cut
    s = batch.run_batch(tiny_engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl.part0"),
                        str(tmp_path / "out.errors.jsonl.part0"), DEFAULTS, progress=False, shard=(0, 2),
                        done_in=(str(tmp_path / "out.jsonl"),))
    # Process 0's lines 2, 4, 6, 8, 10, 12: ids 1 (merged already), none (not JSON), 2 (line 3's), 5, 6, 8.
    assert (s["lines"], s["skipped"], s["errors"], s["ok"]) == (6, 1, 2, 3)


def _result(line_id) -> bytes:
    return json.dumps({"id": line_id, "text": str(line_id), "token_ids": [1]}).encode() + b"\n"


def _error(number, line_id) -> bytes:
    return json.dumps({"line": number, "id": line_id, "error": "bad"}).encode() + b"\n"


def test_merge_resumes_a_killed_merge_and_writes_every_id_once(tmp_path):
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.errors.jsonl"
    # Killed mid-merge: a and b already appended, c half written; every part still there.
    out.write_bytes(_result("a") + _result("b") + _result("c")[:9])
    (tmp_path / "out.jsonl.part0").write_bytes(_result("a") + _result("c") + _result("e")[:5])  # a torn last line
    (tmp_path / "out.jsonl.part1").write_bytes(_result("b") + _result("d"))
    (tmp_path / "out.errors.jsonl.part0").write_bytes(_error(8, "x") + _error(2, None))
    (tmp_path / "out.errors.jsonl.part1").write_bytes(_error(5, 5))
    errors.write_bytes(_error(99, "stale"))  # from an earlier run: replaced

    batch.merge_parts(str(out), str(errors), 2)
    assert out.read_bytes() == _result("a") + _result("b") + _result("c") + _result("d")
    assert errors.read_bytes() == _error(2, None) + _error(5, 5) + _error(8, "x")
    assert sorted(os.listdir(tmp_path)) == ["out.errors.jsonl", "out.jsonl"]

    for name in ("out.jsonl.part0", "out.jsonl.part1", "out.errors.jsonl.part0", "out.errors.jsonl.part1"):
        (tmp_path / name).write_bytes(b"")  # a rerun of a finished job: empty parts
    batch.merge_parts(str(out), str(errors), 2)
    assert out.read_bytes() == _result("a") + _result("b") + _result("c") + _result("d")
    assert errors.read_bytes() == b""


def test_merge_refuses_missing_parts_and_keeps_the_others(tmp_path):
    (tmp_path / "out.jsonl.part0").write_bytes(_result("a"))
    (tmp_path / "out.errors.jsonl.part0").write_bytes(b"")
    with pytest.raises(InputError, match=r"out.jsonl.part1.*filesystem every host sees"):
        batch.merge_parts(str(tmp_path / "out.jsonl"), str(tmp_path / "out.errors.jsonl"), 2)
    assert sorted(os.listdir(tmp_path)) == ["out.errors.jsonl.part0", "out.jsonl.part0"]


def test_cluster_fields_need_distributed_and_a_process_id_in_range():
    with pytest.raises(ConfigError, match="only for a multi-host job"):
        BatchConfig(input="in.jsonl", output="out.jsonl", coordinator_address="127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"process_id.*must be in \[0, 2\), got 2"):
        BatchConfig(input="in.jsonl", output="out.jsonl", distributed=True, num_processes=2, process_id=2)
    BatchConfig(input="in.jsonl", output="out.jsonl", distributed=True, num_processes=2, process_id=1)
