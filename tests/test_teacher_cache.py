"""The offline teacher (compress/distill/teacher_cache.py): the cache holds the pipeline's rows and
exactly the teacher's top-k of them, refuses another teacher, tokenizer, data or k, resumes after
kill -9 to the cache an uninterrupted run writes, and reads back as shuffled, checkpointable batches
that hold every row once per epoch."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore as ts

from compress import config as cfg
from compress.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from compress.distill import teacher_cache as tc
from compress.distill.losses import top_k
from compress.errors import InputError
from compress.models import decoder
from serve import cli
from tests.processes import lock_held_elsewhere
from tests.tiny_decoder import export_tiny_decoder, tiny_decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8
WORDS = ("the of and to in is was for on that with as by at from his her an were are which this be "
         "alpha beta gamma delta lambda tuple list dict yield return import class def while").split()


def _write_documents(directory, count: int, words: int, seed: int = 0) -> str:
    """`count` text files of seeded random words (each a little longer than the last)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
            f.write(" ".join(rng.choice(WORDS, words + 37 * i)) + "\n")
    return str(directory)


def _data(sources: str, **overrides) -> DataConfig:
    return DataConfig(**{"sources": (sources,), "seq_len": 32, "batch_size": 4, "epochs": 1, **overrides})


def _pipeline_rows(data: DataConfig, tokenizer) -> dict[str, np.ndarray]:
    batches = iter(train_batches(data, tokenizer, shard_index=0, shard_count=1))
    try:
        listed = list(batches)
    finally:
        batches.close()
    rows = {key: np.concatenate([batch[key] for batch in listed]) for key in BATCH_KEYS}
    real = rows["segment_ids"].any(axis=1)  # the padding rows completing the last batch are not cached
    assert real[: real.sum()].all()
    return {key: value[real] for key, value in rows.items()}


def _read_all(directory) -> dict[str, np.ndarray]:
    return {name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(directory, name)}},
                          open=True).result().read().result() for name in tc.ARRAYS}


def _manifest(directory) -> dict:
    with open(os.path.join(directory, tc.MANIFEST)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def teacher():
    return tiny_decoder()  # (config, params, tokenizer)


@pytest.fixture(scope="module")
def cache(teacher, tmp_path_factory):
    """A cache of 6 small files in rows of 32 tokens, written 3 rows per teacher forward (the
    pipeline yields 4 a batch: forward batches straddle the pipeline's, and the last is padded)."""
    config, params, tokenizer = teacher
    root = tmp_path_factory.mktemp("cache")
    data = _data(_write_documents(root / "docs", 6, 120))
    summary = tc.write_cache(config, params, tokenizer, data, str(root / "cache"), k=K, teacher_name="tiny",
                             batch_size=3)
    return str(root / "cache"), data, summary


def test_the_cache_holds_the_pipelines_rows_and_the_teachers_top_k_of_them(teacher, cache):
    config, params, tokenizer = teacher
    directory, data, summary = cache
    rows = _pipeline_rows(data, tokenizer)
    stored = _read_all(directory)
    n = len(rows["inputs"])
    assert n > 12 and n % 3 and summary.rows == n and summary.rows_written == n and not summary.already_complete
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(stored[key], rows[key], err_msg=key)
    assert summary.tokens == np.count_nonzero(rows["segment_ids"])

    forward = jax.jit(lambda p, b: top_k(decoder.forward(p, b["inputs"], config, segment_ids=b["segment_ids"],
                                                          positions=b["positions"]).logits, K))
    want = [forward(params, {key: value[i : i + 8] for key, value in rows.items()}) for i in range(0, n, 8)]
    want_ids = np.concatenate([np.asarray(w.ids) for w in want])
    want_log_probs = np.concatenate([np.asarray(w.log_probs) for w in want])
    np.testing.assert_array_equal(stored["teacher_ids"], want_ids)
    assert stored["teacher_log_probs"].dtype == np.float16
    # float16: 11 significant bits, so each log-probability within 2^-11 of its size (and 1e-6 near 0)
    np.testing.assert_allclose(stored["teacher_log_probs"].astype(np.float32), want_log_probs, rtol=2**-11, atol=1e-6)
    assert (np.diff(want_log_probs, axis=-1) <= 0).all()  # most likely first

    source = tc.open_cache(directory)
    assert len(source) == n and source.k == K and source.seq_len == 32
    row = source[n - 1]
    assert set(row) == set(tc.ARRAYS) and row["teacher_ids"].shape == (32, K)
    for name in tc.ARRAYS:
        np.testing.assert_array_equal(row[name], stored[name][n - 1], err_msg=name)

    again = tc.write_cache(config, params, tokenizer, data, directory, k=K, teacher_name="tiny", batch_size=3)
    assert again.already_complete and again.rows_written == 0 and again.rows == n


def test_a_cache_refuses_another_teacher_tokenizer_data_or_k_and_is_left_as_it_was(teacher, cache, tmp_path):
    config, params, tokenizer = teacher
    directory, data, _ = cache
    before = _read_all(directory), _manifest(directory)

    def write(**changes):
        kwargs = {"teacher_config": config, "teacher_params": params, "tokenizer": tokenizer, "data": data, "k": K}
        kwargs.update(changes)
        return tc.write_cache(kwargs.pop("teacher_config"), kwargs.pop("teacher_params"), kwargs.pop("tokenizer"),
                              kwargs.pop("data"), directory, teacher_name="tiny", batch_size=3, **kwargs)

    other_config, other_params, _ = tiny_decoder(seed=1)
    with pytest.raises(InputError, match=rf"{directory} holds a teacher cache of another teacher \(its weights"):
        write(teacher_config=other_config, teacher_params=other_params)
    with pytest.raises(InputError, match=r"another teacher config .*num_layers"):
        write(teacher_config=tiny_decoder(num_layers=1)[0], teacher_params=tiny_decoder(num_layers=1)[1])
    longer = copy.deepcopy(tokenizer)
    longer.add_tokens(["<an added token>"])
    with pytest.raises(InputError, match=r"another tokenizer"):
        write(tokenizer=longer)
    with pytest.raises(InputError, match=r"another data \(seq_len\)"):
        write(data=_data(data.sources[0], seq_len=16))
    with pytest.raises(InputError, match=r"another data \(seed\)"):
        write(data=_data(data.sources[0], seed=3))
    with pytest.raises(InputError, match=r"another k \(8 cached, 4 now\)"):
        write(k=4)
    with pytest.raises(InputError, match=r"data.epochs is None"):
        write(data=_data(data.sources[0], epochs=None))
    after = _read_all(directory), _manifest(directory)
    assert after[1] == before[1]
    for name in tc.ARRAYS:
        np.testing.assert_array_equal(after[0][name], before[0][name])

    # The documents are fingerprinted too: the same file names with other contents are other data.
    docs = _write_documents(tmp_path / "docs", 4, 60)
    small = _data(docs, batch_size=1)
    tc.write_cache(config, params, tokenizer, small, str(tmp_path / "small"), k=2, teacher_name="tiny")
    with open(os.path.join(docs, "doc00.txt"), "a") as f:
        f.write("one more sentence\n")
    with pytest.raises(InputError, match=r"another data \(the documents' contents changed\)"):
        tc.write_cache(config, params, tokenizer, small, str(tmp_path / "small"), k=2, teacher_name="tiny")

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"is not empty and holds no teacher cache"):
        tc.write_cache(config, params, tokenizer, small, str(tmp_path / "busy"), k=2, teacher_name="tiny")

    # Another process writing the same directory holds its lock: this writer is refused, the cache untouched.
    with lock_held_elsewhere(os.path.join(directory, tc.LOCK)), \
            pytest.raises(InputError, match="being written by another press teacher-cache"):
        tc.write_cache(config, params, tokenizer, data, directory, k=K, teacher_name="tiny", batch_size=3)
    assert _manifest(directory) == before[1]


def test_a_distillation_run_gets_only_a_complete_cache_of_its_teacher_tokenizer_seq_len_and_k(teacher, cache, tmp_path):
    config, params, tokenizer = teacher
    directory, _, _ = cache
    fits = tc.CacheExpectation.of(teacher_params=params, tokenizer=tokenizer, seq_len=32, k=K)
    assert tc.open_cache(directory, expect=fits).k == K
    with pytest.raises(InputError, match=r"written by another teacher"):
        tc.open_cache(directory, expect=tc.CacheExpectation.of(teacher_params=tiny_decoder(seed=1)[1]))
    longer = copy.deepcopy(tokenizer)
    longer.add_tokens(["<an added token>"])
    with pytest.raises(InputError, match=r"tokenizer .* is not the run's"):
        tc.open_cache(directory, expect=tc.CacheExpectation.of(tokenizer=longer))
    with pytest.raises(InputError, match=r"rows of seq_len 32, not the run's 64"):
        tc.open_cache(directory, expect=tc.CacheExpectation(seq_len=64))
    with pytest.raises(InputError, match=r"top 8, fewer than the run's k=9"):
        tc.open_cache(directory, expect=tc.CacheExpectation(k=9))
    # A run that never loads its teacher checks it by name and config.
    opened = tc.open_cache(directory)
    tc.check_for_training(opened, teacher_name="tiny", teacher_config=config, tokenizer=tokenizer, seq_len=32, k=K)
    with pytest.raises(InputError, match=r"written by the teacher tiny, not the run's smollm2-135m-instruct"):
        tc.check_for_training(opened, teacher_name="smollm2-135m-instruct")
    with pytest.raises(InputError, match=r"teacher config differs from the run's in dtype \('float32' cached, "
                                         r"'bfloat16' now\)"):
        tc.check_for_training(opened, teacher_config=dataclasses.replace(config, dtype="bfloat16"))
    with pytest.raises(InputError, match=r"fewer than the run's k=9"):
        tc.check_for_training(opened, k=9)
    fewer = tc.open_cache(directory, expect=tc.CacheExpectation(k=3))  # the first 3 of the top 8
    whole = tc.open_cache(directory)
    for name in tc.TEACHER_KEYS:
        np.testing.assert_array_equal(fewer[5][name], whole[5][name][:, :3])

    incomplete = str(tmp_path / "incomplete")
    shutil.copytree(directory, incomplete)
    manifest = _manifest(incomplete)
    tc._write_manifest(incomplete, {**manifest, "rows_done": 6, "complete": False})
    with pytest.raises(InputError, match=r"incomplete \(6 of \d+ rows\); rerun the press teacher-cache command"):
        tc.open_cache(incomplete)
    with pytest.raises(InputError, match=r"no teacher cache here"):
        tc.open_cache(str(tmp_path))


def _press_teacher_cache(*words: str) -> list[str]:
    return [sys.executable, "-m", "serve.cli", "teacher-cache", *words]


def test_a_cache_cut_short_by_kill_9_resumes_to_the_cache_an_uninterrupted_run_writes(tmp_path, capsys):
    teacher_dir = export_tiny_decoder(str(tmp_path / "tiny-teacher"))
    docs = _write_documents(tmp_path / "docs", 8, 700)
    words = [f"--teacher={teacher_dir}", f"--data={docs}", "data.seq_len=32", "data.batch_size=2", "--top-k=8",
             "--batch-size=4"]

    out = str(tmp_path / "killed")
    process = subprocess.Popen(_press_teacher_cache(*words, f"out={out}"), cwd=REPO,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            manifest = _manifest(out) if os.path.exists(os.path.join(out, tc.MANIFEST)) else {}
            if manifest.get("rows_done", 0) >= 8:
                break
            time.sleep(0.01)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    killed = _manifest(out)
    assert 8 <= killed["rows_done"] < killed["rows"] and not killed["complete"], killed
    with pytest.raises(InputError, match="incomplete"):
        tc.open_cache(out)
    # Rows past rows_done may hold a half-written batch: make sure the resumed run rewrites them.
    for name in ("inputs", "teacher_log_probs"):
        array = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(out, name)}},
                        open=True).result()
        array[killed["rows_done"] : killed["rows_done"] + 4].write(7).result()

    assert cli.main(_press_teacher_cache(*words, f"out={out}")[3:]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["resumed_from"] == killed["rows_done"]
    assert resumed["rows_written"] == killed["rows"] - killed["rows_done"]

    whole = str(tmp_path / "whole")
    assert cli.main(_press_teacher_cache(*words, f"out={whole}")[3:]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["resumed_from"] == 0
    assert _manifest(out) == _manifest(whole)
    got, want = _read_all(out), _read_all(whole)
    for name in tc.ARRAYS:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    # The teacher named by another path to the same directory is the same teacher.
    tc.check_for_training(tc.open_cache(whole), teacher_name=os.path.relpath(teacher_dir))

    assert cli.main(_press_teacher_cache(*words, f"out={whole}")[3:]) == 0  # complete: a no-op that says so
    assert "already holds this complete cache" in capsys.readouterr().err
    assert cli.main(_press_teacher_cache(*words, f"out={whole}", "--top-k=4")[3:]) == 2
    assert "another k (8 cached, 4 now)" in capsys.readouterr().err


def _row_ids(source: tc.TeacherCacheSource) -> dict[bytes, int]:
    """Each row's inputs, targets and positions as bytes -> its index (checked unique)."""
    everything = source.read_rows(range(len(source)))
    ids = {_row_key(everything, i): i for i in range(len(source))}
    assert len(ids) == len(source)
    return ids


def _row_key(rows: dict[str, np.ndarray], i: int) -> bytes:
    return b"".join(rows[key][i].tobytes() for key in ("inputs", "targets", "positions"))


def _batch_rows(batches, ids) -> list[int]:
    return [ids[_row_key(batch, i)] for batch in batches for i in range(len(batch["inputs"]))]


def test_cache_batches_hold_every_row_once_per_epoch_reshuffled_and_resume_exactly(cache):
    directory, _, _ = cache
    source = tc.open_cache(directory)
    n = len(source)
    ids = _row_ids(source)

    batches = tc.cache_batches(directory, batch_size=4, seed=1, epochs=2, shard_index=0, shard_count=1)
    listed = list(batches)
    batches.close()
    assert len(listed) == 2 * n // 4  # the last, incomplete batch dropped
    for batch in listed:
        assert {key: value.shape for key, value in batch.items()} == {
            **{key: (4, 32) for key in BATCH_KEYS}, "teacher_ids": (4, 32, K), "teacher_log_probs": (4, 32, K)}
        i = ids[_row_key(batch, 0)]
        np.testing.assert_array_equal(batch["teacher_log_probs"][0], source[i]["teacher_log_probs"])
    order = _batch_rows(listed, ids)
    first, second = order[:n], order[n:]
    assert sorted(first) == list(range(n)) and first != list(range(n))  # each row once, shuffled
    assert len(set(second)) == len(second) == 2 * n // 4 * 4 - n
    assert second != first[: len(second)]  # the second epoch in another order

    in_order = tc.cache_batches(directory, batch_size=4, shuffle=False, epochs=1, shard_index=0, shard_count=1,
                                prefetch=0)
    assert _batch_rows(in_order, ids) == list(range(n // 4 * 4))

    # Two processes: each gets its half of every global batch.
    halves = [tc.cache_batches(directory, batch_size=4, seed=1, epochs=1, shard_index=i, shard_count=2)
              for i in range(2)]
    for batch, (a, b) in zip(listed, zip(*halves)):
        for key in batch:
            np.testing.assert_array_equal(batch[key], np.concatenate([a[key], b[key]]))
    for half in halves:
        half.close()

    forever = tc.cache_batches(directory, batch_size=4, seed=5, epochs=None, shard_index=0, shard_count=1)
    for _ in range(n // 4 + 3):  # into the second epoch
        next(forever)
    state = json.loads(json.dumps(forever.get_state()))
    want = [next(forever) for _ in range(n // 4)]
    forever.close()
    restored = tc.cache_batches(directory, batch_size=4, seed=5, epochs=None, shard_index=0, shard_count=1)
    restored.set_state(state)
    got = [next(restored) for _ in range(n // 4)]
    restored.close()
    assert _batch_rows(got, ids) == _batch_rows(want, ids)
    for a, b in zip(got, want):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    with pytest.raises(InputError, match=r"fewer than a batch"):
        tc.cache_batches(directory, batch_size=n + 1, shard_index=0, shard_count=1)


def test_the_shipped_config_and_flags_build_the_command_config():
    path = os.path.join(REPO, "configs", "teacher-cache-smollm2.yaml")
    config = cfg.config_from_args(cli.parse(["teacher-cache", path]))
    assert (config.teacher.name, config.data.sources, config.data.seq_len, config.top_k, config.out) == (
        "smollm2-135m-instruct", ("pydoc",), 256, 32, "out/teacher-cache")
    flags = cfg.config_from_args(cli.parse(["teacher-cache", path, "--teacher", "some/dir", "--top-k", "16",
                                            "--out", "x", "--batch-size", "2", "data.epochs=2"]))
    assert (flags.teacher.name, flags.top_k, flags.out, flags.batch_size, flags.data.epochs) == (
        "some/dir", 16, "x", 2, 2)
    with pytest.raises(cfg.ConfigError, match="data.epochs is null"):
        cfg.config_from_args(cli.parse(["teacher-cache", path, "data.epochs=null"]))
