"""press synthesize on a tiny random teacher: every prompt gets the teacher's own answer as a chat
the training pipeline reads (loss on the answers only), truncated answers are kept apart, bad
lines go to the errors file, and a job stopped anywhere, kill -9 included, resumes to the lines
of an uninterrupted one."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from compress import config as cfg
from compress.data.pipeline import DataConfig, train_batches
from compress.pretrained import ModelConfig
from serve import cli
from serve.commands.synthesize import SynthesizeConfig, answer_seed, synthesize
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.devices import xla_flags
from tests.processes import REPO
from tests.test_batch_lines import _Borrowed

ENGINE = {"max_slots": 4, "max_seq_len": 256}
SAMPLING = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.95, seed=0)  # the data defaults, shorter
SYSTEM = "You are a patient teacher."
END_OF_TURN = "<|im_end|>\n"  # what SmolLM2's chat template closes every message with
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2 + 2?"}]


def _good(stop_token: int) -> list[dict]:
    """The good lines of the mixed job: a prompt, messages without an id (the id is the line
    number, 2), a multi-turn chat with its own system message, and a greedy line whose stop
    token is the teacher's second answer token (so it ends with 'stop', the others at the limit)."""
    return [
        {"id": "a", "prompt": "What is a list?"},
        {"messages": [{"role": "user", "content": "Name a colour."}]},
        {"id": 7, "messages": CHAT},
        {"id": "stop", "prompt": "Say one word.", "sampling": {"temperature": 0, "stop_token_ids": [stop_token]}},
    ]


BAD = [  # (raw line, id in the errors file, words of its message)
    (b"{not json", None, "not valid JSON"),
    (rb'{"id": "sp", "prompt": "a\ud800b"}', "sp", "'prompt' holds a lone surrogate"),
    (b'{"id": "as", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "as", "the last message is the assistant's"),
    (b'{"id": "rc", "messages": [{"role": "user", "content": 5}]}', "rc", "needs string 'role' and 'content'"),
    (b'{"id": "a", "prompt": "again"}', "a", "duplicate id 'a' (first on line 1)"),
    (b'{"id": 2, "prompt": "line two has id 2"}', 2, "duplicate id 2 (first on line 2)"),
    (b'{"id": "bs", "prompt": "x", "sampling": {"top_p": 3}}', "bs", "top_p"),
    (b'{"id": "long", "prompt": "' + b"word " * 300 + b'"}', "long", "exceeds the engine's context"),  # the engine's
]


def _lines(good: list[dict]) -> list[bytes]:
    """Good and bad lines interleaved (the good ones first in their places), one blank line."""
    raw = [json.dumps(g).encode() for g in good]
    return [raw[0], raw[1], BAD[0][0], BAD[1][0], b"", raw[2], *[b for b, _, _ in BAD[2:6]], raw[3],
            *[b for b, _, _ in BAD[6:]]]


def _read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, "rb").read().decode("utf-8").splitlines()]


def _messages(line: dict) -> list[dict]:
    """What the teacher was asked: the line's messages, SYSTEM first where it has none."""
    messages = line["messages"] if "messages" in line else [{"role": "user", "content": line["prompt"]}]
    return messages if any(m["role"] == "system" for m in messages) else [{"role": "system", "content": SYSTEM},
                                                                           *messages]


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    with Engine.from_pretrained(tiny_chat_dir, **ENGINE) as e:
        yield e


def _config(root, tiny_chat_dir, **fields) -> SynthesizeConfig:
    return SynthesizeConfig(**{"prompts": str(root / "prompts.jsonl"), "out": str(root / "data.jsonl"),
                               "teacher": ModelConfig(name=tiny_chat_dir), "sampling": SAMPLING, "system": SYSTEM,
                               "progress": False, **fields})


@pytest.fixture(scope="module")
def job(engine, tiny_chat_dir, tmp_path_factory):
    """The mixed job run once through `press synthesize` (with the module's engine): (root, good, status, summary)."""
    probe = engine.generate(_messages({"prompt": "Say one word."}), SamplingParams(max_new_tokens=2))[0].token_ids
    assert len(probe) == 2 and probe[1] != probe[0]  # the greedy answer goes on past its first token
    good = _good(stop_token=probe[1])
    root = tmp_path_factory.mktemp("job")
    (root / "prompts.jsonl").write_bytes(b"\n".join(_lines(good)) + b"\n")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(Engine, "from_pretrained", lambda *args, **kwargs: _Borrowed(engine))
        status = cli.main(["synthesize", "--teacher", tiny_chat_dir, "--prompts", str(root / "prompts.jsonl"),
                           "--out", str(root / "data.jsonl"), "--system", SYSTEM, "--no-progress",
                           "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.95", "--seed", "0"])
    return root, good, status, json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_every_prompt_gets_one_chat_example_and_truncated_ones_are_kept_apart(job, tiny_chat_dir):
    root, good, status, summary = job
    kept, truncated = _read(root / "data.jsonl"), _read(root / "data.truncated.jsonl")
    assert [line["id"] for line in kept] == ["stop"]  # the only answer that ended by itself
    assert sorted(map(str, (line["id"] for line in truncated))) == ["2", "7", "a"]
    assert all(line["finish_reason"] == "length" for line in truncated) and kept[0]["finish_reason"] == "stop"
    for line in kept + truncated:
        asked = _messages(next(g for i, g in enumerate(good) if g.get("id", 2) == line["id"]))
        assert set(line) == {"id", "messages", "teacher", "finish_reason"}
        assert line["messages"][:-1] == asked and line["messages"][-1]["role"] == "assistant"
        assert line["teacher"] == tiny_chat_dir
    assert sorted(os.listdir(root)) == ["data.errors.jsonl", "data.jsonl", "data.truncated.jsonl", "prompts.jsonl"]
    assert status == 1  # some lines are in the errors file


def test_answers_are_the_teachers_own(job, engine):
    """Each answer is what the engine generates for that chat with that answer's seed."""
    root, good, _, _ = job
    answers = {line["id"]: line["messages"][-1]["content"]
               for line in _read(root / "data.jsonl") + _read(root / "data.truncated.jsonl")}
    ids = [g.get("id", 2) for g in good]
    params = [dataclasses.replace(SAMPLING, **g.get("sampling", {}), seed=answer_seed(0, i, 0)) for g, i in zip(good, ids)]
    want = engine.generate([_messages(g) for g in good], params)
    assert {i: answers[i] for i in ids} == {i: w.text for i, w in zip(ids, want)}
    assert len({w.text for w in want}) == len(want) and all(w.token_ids for w in want)


def test_the_training_pipeline_reads_them_and_trains_on_the_answers_only(job, engine):
    root, _, _, _ = job
    files = (str(root / "data.jsonl"), str(root / "data.truncated.jsonl"))
    lines = [line for path in files for line in _read(path)]
    config = DataConfig(sources=files, seq_len=64, batch_size=1, shuffle=False, epochs=1, prefetch=0)
    batches = list(train_batches(config, engine.tokenizer, shard_index=0, shard_count=1))
    targets = np.concatenate([b["targets"][0] for b in batches])
    mask = np.concatenate([b["loss_mask"][0] for b in batches])
    decode = lambda ids: engine.tokenizer.decode([int(t) for t in ids], skip_special_tokens=False)  # noqa: E731
    # Every assistant turn, the chat's given one included, and its end-of-turn token; nothing else.
    trained = "".join(m["content"] + END_OF_TURN for line in lines for m in line["messages"] if m["role"] == "assistant")
    assert decode(targets[mask == 1]) == trained
    untrained = decode(targets[(mask == 0) & (targets != 0)])
    assert all(m["content"] in untrained for line in lines for m in line["messages"] if m["role"] != "assistant")


def test_bad_lines_go_to_the_errors_file_by_their_line_in_the_prompts_file(job):
    root, good, _, summary = job
    lines = _lines(good)
    errors = _read(root / "data.errors.jsonl")
    assert [e["line"] for e in errors] == sorted(lines.index(raw) + 1 for raw, _, _ in BAD)
    for e, (raw, line_id, words) in zip(errors, sorted(BAD, key=lambda b: lines.index(b[0]))):
        assert e["id"] == line_id and words in e["error"], (raw[:80], e)
    s = summary
    assert (s["prompts"], s["blank"], s["answers"], s["ok"], s["truncated"], s["skipped"]) == (12, 1, 5, 1, 3, 0)
    assert (s["bad_prompts"], s["failed"], s["errors"]) == (7, 1, 8)  # "long" reached the engine, which refused it
    assert s["ok"] + s["truncated"] + s["skipped"] + s["failed"] == s["answers"]


def test_a_rerun_writes_nothing_twice_and_lists_the_bad_lines_again(job, engine, tiny_chat_dir, tmp_path):
    root, _, _, _ = job
    for name in ("prompts.jsonl", "data.jsonl", "data.truncated.jsonl", "data.errors.jsonl"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    generated = engine.stats["generated_tokens"]
    s = synthesize(engine, _config(tmp_path, tiny_chat_dir))
    assert (s["ok"], s["truncated"], s["skipped"], s["requests"], s["errors"]) == (0, 0, 4, 0, len(BAD))
    assert engine.stats["generated_tokens"] == generated
    for name in ("data.jsonl", "data.truncated.jsonl", "data.errors.jsonl"):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name


def test_keep_truncated_writes_them_to_the_output(job, engine, tiny_chat_dir, tmp_path):
    root, _, _, _ = job
    (tmp_path / "prompts.jsonl").write_bytes((root / "prompts.jsonl").read_bytes())
    s = synthesize(engine, _config(tmp_path, tiny_chat_dir, keep_truncated=True))
    assert (s["ok"], s["truncated"], s["truncated_file"]) == (4, 0, None)
    expected = _read(root / "data.jsonl") + _read(root / "data.truncated.jsonl")
    assert sorted(_read(tmp_path / "data.jsonl"), key=lambda r: str(r["id"])) == \
        sorted(expected, key=lambda r: str(r["id"]))
    assert not (tmp_path / "data.truncated.jsonl").exists()


PLAIN = "What is a tuple?\n\n  Why use a set?  \nWhat does zip do?\n"  # one prompt a line; ids 1, 3, 4


def test_several_samples_of_a_text_file_differ_and_are_each_the_teachers(engine, tiny_chat_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text(PLAIN)
    config = _config(tmp_path, tiny_chat_dir, prompts=str(tmp_path / "prompts.txt"), samples_per_prompt=2,
                     keep_truncated=True)
    s = synthesize(engine, config)
    assert (s["prompts"], s["blank"], s["answers"], s["ok"], s["errors"]) == (3, 1, 6, 6, 0)
    lines = {line["id"]: line for line in _read(tmp_path / "data.jsonl")}
    assert sorted(lines) == ["1/0", "1/1", "3/0", "3/1", "4/0", "4/1"]
    prompts = {1: "What is a tuple?", 3: "Why use a set?", 4: "What does zip do?"}
    keys = [(n, k) for n in prompts for k in (0, 1)]
    asked = {n: _messages({"prompt": prompt}) for n, prompt in prompts.items()}
    want = engine.generate([asked[n] for n, _ in keys],
                           [dataclasses.replace(SAMPLING, seed=answer_seed(0, n, k)) for n, k in keys])
    for (n, k), w in zip(keys, want):
        line = lines[f"{n}/{k}"]
        assert line["sample"] == k and line["messages"] == [*asked[n], {"role": "assistant", "content": w.text}]
    assert all(lines[f"{n}/0"]["messages"] != lines[f"{n}/1"]["messages"] for n in prompts)
    with pytest.raises(cfg.ConfigError, match="temperature above 0"):
        cfg.load(SynthesizeConfig, "configs/synthesize.yaml", ["samples_per_prompt=2", "sampling.temperature=0"])


def _prompts(count: int) -> bytes:
    return b"".join(json.dumps({"id": f"q{i}", "prompt": f"Question number {i}?"}).encode() + b"\n"
                    for i in range(count))


STOP_SOME = "in"  # ends half of the tiny teacher's answers to these prompts; the other half are cut


def _resumable_config(root, tiny_chat_dir):
    return _config(root, tiny_chat_dir, sampling=dataclasses.replace(SAMPLING, stop=(STOP_SOME,)))


@pytest.fixture(scope="module")
def uninterrupted(engine, tiny_chat_dir, tmp_path_factory):
    """The lines of OUT and TRUNCATED of a 10-prompt job run in one go (some answers stop, some are cut)."""
    root = tmp_path_factory.mktemp("whole")
    (root / "prompts.jsonl").write_bytes(_prompts(10))
    synthesize(engine, _resumable_config(root, tiny_chat_dir))
    return sorted((root / "data.jsonl").read_bytes().splitlines()), \
        sorted((root / "data.truncated.jsonl").read_bytes().splitlines())


def _assert_the_uninterrupted_lines(root, uninterrupted):
    kept, truncated = uninterrupted
    assert kept and truncated  # both files are exercised
    assert sorted((root / "data.jsonl").read_bytes().splitlines()) == kept
    assert sorted((root / "data.truncated.jsonl").read_bytes().splitlines()) == truncated
    assert sorted(os.listdir(root)) == ["data.errors.jsonl", "data.jsonl", "data.truncated.jsonl", "prompts.jsonl"]


def test_a_run_on_part_of_the_prompts_then_on_all_of_them_gives_every_id_once(engine, tiny_chat_dir, tmp_path,
                                                                            uninterrupted):
    (tmp_path / "prompts.jsonl").write_bytes(_prompts(4))
    first = synthesize(engine, _resumable_config(tmp_path, tiny_chat_dir))
    (tmp_path / "prompts.jsonl").write_bytes(_prompts(10))
    s = synthesize(engine, _resumable_config(tmp_path, tiny_chat_dir))
    assert first["ok"] + first["truncated"] == 4 and (s["skipped"], s["requests"]) == (4, 6)
    _assert_the_uninterrupted_lines(tmp_path, uninterrupted)


def test_torn_last_lines_of_a_killed_run_are_answered_again(engine, tiny_chat_dir, tmp_path, uninterrupted):
    (tmp_path / "prompts.jsonl").write_bytes(_prompts(10))
    kept, truncated = uninterrupted
    (tmp_path / "data.jsonl").write_bytes(b"".join(line + b"\n" for line in kept[:-1]) + kept[-1][:20])
    (tmp_path / "data.truncated.jsonl").write_bytes(b"".join(line + b"\n" for line in truncated[:-1]) +
                                                    truncated[-1][:-3])
    s = synthesize(engine, _resumable_config(tmp_path, tiny_chat_dir))
    assert (s["requests"], s["skipped"]) == (2, 8)
    _assert_the_uninterrupted_lines(tmp_path, uninterrupted)


# A job killed (SIGKILL) as it writes its eighth answer, with seven written (to both files) and more in flight.
KILLED = textwrap.dedent("""
    import os, signal, sys
    from serve import batch
    from serve.cli import main

    real, answers = batch.result_json, []
    def result_json(record):
        if "teacher" in record:  # an answer, not a request line
            answers.append(record)
            if len(answers) == 8:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(record)
    batch.result_json = result_json
    sys.exit(main(sys.argv[1:]))
""")


def test_a_job_killed_with_sigkill_resumes_to_the_lines_of_an_uninterrupted_one(engine, tiny_chat_dir, tmp_path,
                                                                               uninterrupted):
    (tmp_path / "prompts.jsonl").write_bytes(_prompts(10))
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": xla_flags(1)}
    argv = ["synthesize", "--teacher", tiny_chat_dir, "--prompts", str(tmp_path / "prompts.jsonl"), "--out",
            str(tmp_path / "data.jsonl"), "--system", SYSTEM, "--max-new-tokens", "6", "--temperature", "0.7",
            "--top-p", "0.95", "--seed", "0", "--stop", STOP_SOME, "--max-slots",
            str(ENGINE["max_slots"]), "--max-seq-len", str(ENGINE["max_seq_len"]), "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILLED, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    written = [len(_read(tmp_path / name)) for name in ("data.jsonl", "data.truncated.jsonl")]
    assert sum(written) == 7 and min(written) > 0, written
    assert any(name.endswith(".synthesize-requests") for name in os.listdir(tmp_path))  # left behind

    s = synthesize(engine, _resumable_config(tmp_path, tiny_chat_dir))
    assert (s["skipped"], s["requests"]) == (7, 3)
    _assert_the_uninterrupted_lines(tmp_path, uninterrupted)
