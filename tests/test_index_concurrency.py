"""Several processes on one index directory: concurrent `press index add` both land, a stale
save is refused, a writer waits for the lock another process holds, and a load that overlaps
a save's commit loads the new index."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from retrieval import store
from retrieval.chunking import ChunkingConfig
from retrieval.documents import Document, read_documents
from retrieval.encoder import SentenceEncoder
from retrieval.retriever import Retriever
from retrieval.store import IndexChangedError
from tests.tiny_retrieval import save_tiny_encoder, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNKING = ChunkingConfig(chunk_tokens=24, overlap=6)
ROUNDS = 3


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return SentenceEncoder.from_dir(encoder_dir, batch_size=8)


@pytest.fixture
def index(encoder, tmp_path):
    """A saved index of the small corpus in tmp_path/idx (document root tmp_path)."""
    write_corpus(str(tmp_path / "docs"))
    retriever = Retriever(encoder, chunking=CHUNKING, exact=True)
    retriever.add(read_documents([str(tmp_path / "docs")]))
    retriever.save(str(tmp_path / "idx"))
    return str(tmp_path / "idx")


def _doc(name: str) -> Document:
    return Document(name, f"The {name} document talks about {name} at length.", name)


# `press index add` of one new file per round, each round started when the test says go.
WORKER = textwrap.dedent("""
    import os, sys, time
    from serve.cli import main

    worker, rounds = sys.argv[1], int(sys.argv[2])
    for r in range(rounds):
        open(f"sync/ready-{worker}-{r}", "w").close()
        while not os.path.exists(f"sync/go-{r}"):
            time.sleep(0.001)
        code = main(["index", "add", "--index", "idx", "--docs", f"new/{worker}-{r}.txt", "--no-progress"])
        if code:
            sys.exit(code)
""")


def _wait_for(paths, procs, timeout=300):
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(p) for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"a worker exited with {proc.returncode} before {paths}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.01)


def test_two_processes_adding_at_once_both_land(index, tmp_path):
    # The workers share compiled encoder programs through JAX's cache: each `press index add`
    # makes a new encoder, which would otherwise compile them again (seconds on a busy CPU).
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    base = len(Retriever.load(index).documents())
    os.makedirs(tmp_path / "new")
    os.makedirs(tmp_path / "sync")
    workers = ("a", "b")
    for w in workers:
        for r in range(ROUNDS):
            (tmp_path / "new" / f"{w}-{r}.txt").write_text(f"Worker {w} wrote this in round {r} about kites {w}{r}.")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, w, str(ROUNDS)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in workers]
    try:
        for r in range(ROUNDS):  # both workers at the barrier, then both at once
            _wait_for([tmp_path / "sync" / f"ready-{w}-{r}" for w in workers], procs)
            (tmp_path / "sync" / f"go-{r}").touch()
        results = [proc.communicate(timeout=300) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    # Each round's two adds ran one after the other: one saw the other's document.
    totals = [[int(line.split("; ")[-1].split()[0]) for line in out.splitlines()] for out, _ in results]
    for r in range(ROUNDS):
        assert sorted(t[r] for t in totals) == [base + 2 * r + 1, base + 2 * r + 2], totals
    documents = Retriever.load(index).documents()  # loads: every file verified
    assert len(documents) == base + 2 * ROUNDS
    assert {f"new/{w}-{r}.txt" for w in workers for r in range(ROUNDS)} <= set(documents)


def test_a_save_over_a_newer_index_is_refused(index, encoder, tmp_path):
    first, second = Retriever.load(index, encoder=encoder), Retriever.load(index, encoder=encoder)
    first.add([_doc("first")])
    first.save(index)
    second.add([_doc("second")])
    with pytest.raises(IndexChangedError, match=rf"^{index}: another process saved an update .* Load it again"):
        second.save(index)
    assert {"first"} == {"first", "second"} & set(Retriever.load(index, encoder=encoder).documents())
    # The update made under the writer lock, from load to save, keeps both.
    with Retriever.updating(index, encoder=encoder) as retriever:
        retriever.add([_doc("second")])
    assert {"first", "second"} <= set(Retriever.load(index, encoder=encoder).documents())
    first.add([_doc("third")])  # saved before, but not since the update: refused too
    with pytest.raises(IndexChangedError):
        first.save(index)
    # Saving elsewhere, or a new index over this one (what `press index build` does), replaces it.
    first.save(str(tmp_path / "copy"))
    first.save(str(tmp_path / "copy"))
    fresh = Retriever(encoder, chunking=CHUNKING)
    fresh.add([_doc("only")])
    fresh.save(index)
    assert set(Retriever.load(index, encoder=encoder).documents()) == {"only"}


# Holds the writer lock as the documented protocol says (flock on DIR/write.lock) until stdin closes.
HOLDER = "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); " \
         "sys.stdin.read()"


def test_an_update_waits_for_the_process_holding_the_lock(index, encoder):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(index, "write.lock")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        waiting, done, errors = threading.Event(), threading.Event(), []

        def update():
            try:
                with Retriever.updating(index, encoder=encoder, on_wait=waiting.set) as retriever:
                    retriever.add([_doc("late")])
                done.set()
            except Exception as e:  # noqa: BLE001 - asserted below
                errors.append(e)

        thread = threading.Thread(target=update)
        thread.start()
        assert waiting.wait(60) and not done.is_set()  # told why, and blocked
    finally:
        holder.stdin.close()
        holder.wait(60)
    thread.join(120)
    assert not errors and done.is_set() and "late" in Retriever.load(index, encoder=encoder).documents()


def test_a_load_overlapping_a_save_loads_the_new_index(index, encoder, monkeypatch):
    writer = Retriever.load(index, encoder=encoder)
    writer.add([_doc("new")])
    read = store.MetadataStore.read

    def read_then_commit(path, **options):  # another process commits right after this load read meta.sqlite
        metadata = read(path, **options)
        if writer.documents().keys() - set(metadata.documents()):
            writer.save(index)  # deletes the vectors file the metadata just read names
        return metadata

    monkeypatch.setattr(store.MetadataStore, "read", staticmethod(read_then_commit))
    assert "new" in Retriever.load(index, encoder=encoder).documents()
