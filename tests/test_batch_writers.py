"""One batch job per output: a second `press batch` on an output another job is writing is refused
at once (it had written every result a second time), and resumes once the first has ended."""

import json
import os
import subprocess
import sys
import threading

import pytest

from compress.errors import InputError
from serve import batch
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.devices import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = SamplingParams(max_new_tokens=3)
ENGINE = {"max_slots": 2, "max_seq_len": 64}
LINES = [{"id": i, "prompt": f"Item number {i} is"} for i in range(6)]


@pytest.fixture(scope="module")
def tiny_engine(tiny_chat_dir):
    with Engine.from_pretrained(tiny_chat_dir, **ENGINE) as e:
        yield e


def _press_batch(tiny_chat_dir, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}  # one device; the rest as conftest set it
    return subprocess.run([sys.executable, "-m", "serve.cli", "batch", "--model", tiny_chat_dir,
                           "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                           "--max-new-tokens", str(DEFAULTS.max_new_tokens), "--max-slots", str(ENGINE["max_slots"]),
                           "--max-seq-len", str(ENGINE["max_seq_len"]), "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _ids(path) -> list:
    return [json.loads(line)["id"] for line in path.read_bytes().decode().splitlines()]


def test_a_second_process_on_the_same_output_is_refused_then_resumes(tiny_chat_dir, tiny_engine, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    writing, release = threading.Event(), threading.Event()

    def held(obj, result):  # the first job holds its output while its first result is written
        writing.set()
        release.wait(300)
        return {"id": obj["id"], "text": result.text}

    first = {}
    thread = threading.Thread(target=lambda: first.update(batch.run_batch(
        tiny_engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), defaults=DEFAULTS, progress=False,
        result_line=held)))
    thread.start()
    try:
        assert writing.wait(300)
        second = _press_batch(tiny_chat_dir, tmp_path)  # another process, while the first job writes
        assert second.returncode == 2, second.stderr
        assert "is being written by another press batch job" in second.stderr and "Traceback" not in second.stderr
        with pytest.raises(InputError, match="being written by another"):  # another thread of this process
            batch.run_batch(tiny_engine, str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), defaults=DEFAULTS,
                            progress=False)
    finally:
        release.set()
        thread.join()
    assert first["ok"] == len(LINES) and sorted(_ids(tmp_path / "out.jsonl")) == list(range(len(LINES)))

    again = _press_batch(tiny_chat_dir, tmp_path)  # once the first has ended: it resumes, nothing left to do
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["skipped"] == len(LINES)
    assert sorted(_ids(tmp_path / "out.jsonl")) == list(range(len(LINES)))  # every id once
