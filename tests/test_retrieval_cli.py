"""`press index build/add/remove/search` end to end on a tiny random encoder, and a build
killed midway (SIGKILL) that leaves the saved index whole."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from retrieval.retriever import Retriever
from serve.cli import main
from tests.tiny_retrieval import save_tiny_encoder, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the commands below name docs/ and idx relative to it
    write_corpus(str(tmp_path / "docs"))
    return tmp_path


def press(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def build(capsys, encoder_dir, *extra):
    return press(capsys, "index", "build", "--docs", "docs", "--index", "idx", "--encoder", encoder_dir,
                 "--chunk-tokens", "24", "--overlap", "6", "--no-progress", *extra)


def search(capsys, query, k=20):
    code, out, err = press(capsys, "index", "search", "--index", "idx", query, "-k", str(k), "--json")
    assert code == 0, err
    return json.loads(out)


def test_build_search_add_remove(corpus, encoder_dir, capsys):
    code, out, err = build(capsys, encoder_dir, "--dtype", "f16", "--connectivity", "8")
    assert code == 0, err
    assert out.startswith("built idx: 4 documents,") and "32-d f16 vectors" in out
    index = Retriever.load("idx")
    assert index.settings.dtype == "f16" and index.settings.connectivity == 8
    assert sorted(index.documents()) == sorted(["docs/guide.md", "docs/notes/bikes.txt", "q-bread",
                                                "docs/notes/faq.jsonl#3"])

    hits = search(capsys, "Rim brake pads wear down")
    code, out, _ = press(capsys, "index", "search", "--index", "idx", "Rim brake pads wear down", "--json",
                         "--dense-only", "-k", "50")
    dense = json.loads(out)
    assert code == 0 and dense == sorted(dense, key=lambda h: -h["score"]) and len(dense) == len(hits) == len(index)
    # The random encoder ranks the chunk holding those very words low; keyword matches lift it.
    rank = lambda found: [h["heading"] for h in found].index("Bicycle maintenance > Brakes")
    assert rank(hits) < 3 and rank(hits) < rank(dense)
    assert set(hits[0]) >= {"score", "text", "doc_id", "source", "heading", "start", "end", "metadata"}
    with open("docs/notes/bikes.txt", newline="") as f:
        bikes = f.read()
    for h in hits:
        if h["doc_id"] == "docs/notes/bikes.txt":
            assert bikes[h["start"] : h["end"]] == h["text"]
    code, out, _ = press(capsys, "index", "search", "--index", "idx", "sourdough", "-k", "2")
    assert code == 0 and out.startswith("1. ") and "\n2. " in out and "chars" in out
    # A query of bytes that are not UTF-8 (a Latin-1 terminal's "café"; Python reads argv with surrogateescape)
    code, _, err = press(capsys, "index", "search", "--index", "idx", os.fsdecode(b"caf\xe9"))
    assert code == 2 and "the query holds a lone surrogate (U+DCE9 at character 3)" in err, err

    # Add: one new file, one changed; the rest unchanged.
    with open("docs/notes/bikes.txt", "w") as f:
        f.write("Bicycle maintenance\n===================\n\nOnly saddles now.\n")
    with open("docs/kites.md", "w") as f:
        f.write("# Kites\n\nA kite flies best in a steady wind.\n")
    code, out, err = press(capsys, "index", "add", "--index", "idx", "--docs", "docs", "--no-progress")
    assert code == 0, err
    assert "1 documents added, 1 replaced, 3 unchanged" in out
    texts = {h["doc_id"]: h["text"] for h in search(capsys, "anything", 50)}
    assert "saddles" in texts["docs/notes/bikes.txt"] and "kite" in texts["docs/kites.md"]
    assert not any("tyre pressure" in h["text"] for h in search(capsys, "tyre pressure", 50))

    # Remove.
    code, out, err = press(capsys, "index", "remove", "--index", "idx", "--doc-id", "docs/guide.md", "q-bread")
    assert code == 0, err
    assert "removed 2 documents" in out
    left = {h["doc_id"] for h in search(capsys, "tomatoes", 50)}
    assert left == {"docs/notes/bikes.txt", "docs/notes/faq.jsonl#3", "docs/kites.md"}
    code, _, err = press(capsys, "index", "remove", "--index", "idx", "--doc-id", "docs/kites.md", "nope")
    assert code == 2 and "no document with id 'nope'" in err
    assert "docs/kites.md" in Retriever.load("idx").documents()  # nothing removed


def test_build_errors_before_work(corpus, encoder_dir, capsys):
    (corpus / "notes.txt").write_text("mine")
    code, _, err = press(capsys, "index", "build", "--docs", "docs", "--index", "notes.txt", "--encoder", encoder_dir)
    assert code == 2 and "notes.txt is a file" in err
    code, _, err = press(capsys, "index", "build", "--docs", "missing", "--index", "idx", "--encoder", encoder_dir)
    assert code == 2 and "missing: no such file or directory" in err
    code, _, err = build(capsys, encoder_dir, "--overlap", "20")
    assert code == 2 and "overlap=20" in err
    code, _, err = press(capsys, "index", "search", "--index", "nowhere", "x")
    assert code == 2 and "nowhere: no such index directory" in err
    assert not os.path.exists("idx")


def test_an_index_built_on_a_quantized_encoder_queries_with_it(corpus, encoder_dir, capsys):
    code, out, err = build(capsys, encoder_dir, "--encoder-quantization", "int8")
    assert code == 0, err
    index = Retriever.load("idx")  # the encoder named in the index, quantized as recorded
    assert index.encoder.quantization == "int8"
    assert index.encoder.params["layers"]["up"]["qkernel"].dtype == np.int8
    assert search(capsys, "sourdough bread")[0]["doc_id"] == "q-bread"
    code, _, err = build(capsys, encoder_dir, "--encoder-quantization", "int5")
    assert code == 2 and "valid schemes: int8" in err


def test_document_ids_do_not_depend_on_the_current_directory(corpus, encoder_dir, capsys, monkeypatch):
    assert build(capsys, encoder_dir)[0] == 0
    index, docs = str(corpus / "idx"), str(corpus / "docs")
    ids = sorted(Retriever.load(index).documents())
    assert ids == sorted(["docs/guide.md", "docs/notes/bikes.txt", "q-bread", "docs/notes/faq.jsonl#3"])
    (corpus / "elsewhere").mkdir()
    (corpus / "docs" / "guide.md").write_text("# Garden guide\n\nOnly cacti now.\n")
    for cwd, path, report in [
        (docs, ".", "0 documents added, 1 replaced, 3 unchanged"),  # the changed file replaced, no copies
        (str(corpus / "elsewhere"), docs, "0 documents added, 0 replaced, 4 unchanged"),
        ("/", os.path.join(docs, "notes"), "0 documents added, 0 replaced, 3 unchanged"),  # a subfolder
    ]:
        monkeypatch.chdir(cwd)
        code, out, err = press(capsys, "index", "add", "--index", index, "--docs", path, "--no-progress")
        assert code == 0 and report in out, (cwd, path, out, err)
    assert sorted(Retriever.load(index).documents()) == ids
    assert "cacti" in Retriever.load(index).search("cacti", 1)[0].text


def _downgrade_to_format_1(meta: str) -> None:
    """Make a saved index look as press wrote it before format 2 (no revision, root or checksum)."""
    db = sqlite3.connect(meta)
    with db:
        db.execute("DELETE FROM manifest WHERE name IN ('revision', 'docs_root', 'metadata_sha256')")
        db.execute("UPDATE manifest SET value = '1' WHERE name = 'format'")
    db.close()


def test_an_index_from_before_recorded_roots_keeps_its_ids(corpus, encoder_dir, capsys, monkeypatch):
    assert build(capsys, encoder_dir)[0] == 0
    _downgrade_to_format_1("idx/meta.sqlite")
    with pytest.warns(UserWarning, match="index format 1"):
        ids = sorted(Retriever.load("idx").documents())
    # Its ids were relative to the directory press ran in: they still are, and that is recorded.
    with pytest.warns(UserWarning, match="index format 1"):
        code, out, err = press(capsys, "index", "add", "--index", "idx", "--docs", "docs", "--no-progress")
    assert code == 0 and "0 documents added, 0 replaced, 4 unchanged" in out
    assert f"relative to the current directory, {corpus}, as before" in err
    monkeypatch.chdir(corpus / "docs")
    code, out, err = press(capsys, "index", "add", "--index", "../idx", "--docs", ".", "--no-progress")
    assert code == 0 and "4 unchanged" in out and not err
    assert sorted(Retriever.load("../idx").documents()) == ids


def test_a_damaged_index_is_one_line_naming_the_file_and_exit_2(corpus, encoder_dir, capsys):
    assert build(capsys, encoder_dir)[0] == 0
    db = sqlite3.connect("idx/meta.sqlite")
    with db:
        db.execute("UPDATE chunks SET text = 'Plant tomatoes in the shade.' WHERE key = 0")
    db.close()
    for argv in (["search", "tomatoes"], ["add", "--docs", "docs", "--no-progress"], ["remove", "--doc-id", "q-bread"]):
        code, out, err = press(capsys, "index", argv[0], "--index", "idx", *argv[1:])
        assert code == 2 and not out and err.count("\n") == 1, err
        assert "idx/meta.sqlite: its manifest, documents or chunks differ from the checksum" in err


# The script a killed build runs: `press index add` with a SIGKILL at a chosen point.
KILLED = textwrap.dedent("""
    import os, signal, sys
    point = sys.argv[1]
    from retrieval import store
    from retrieval.encoder import SentenceEncoder
    from serve.cli import main

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "embedding":  # the third encoder call, with chunks already embedded
        real = SentenceEncoder.encode
        calls = []
        def encode(self, texts):
            calls.append(1)
            if len(calls) == 3:  # 1: the probe; 2: the first chunks
                die()
            return real(self, texts)
        SentenceEncoder.encode = encode
    else:
        real_replace = os.replace
        def replace(src, dst):
            if point == "before-vectors" and dst.endswith(".usearch"):
                die()
            if point == "before-commit" and dst.endswith("meta.sqlite"):
                die()
            real_replace(src, dst)
            if point == "after-commit" and dst.endswith("meta.sqlite"):
                die()  # before the old vectors file is deleted
        store.os.replace = replace
    sys.exit(main(["index", "add", "--index", "idx", "--docs", "more", "--no-progress"]))
""")


@pytest.mark.parametrize("point", ["embedding", "before-vectors", "before-commit", "after-commit"])
def test_killed_update_leaves_a_whole_index(corpus, encoder_dir, capsys, point):
    assert build(capsys, encoder_dir)[0] == 0
    before = Retriever.load("idx")
    old = {k: v.fingerprint for k, v in before.documents().items()}
    os.makedirs("more")
    for i in range(120):  # enough chunks for several encoder calls
        (corpus / "more" / f"doc{i}.txt").write_text(f"Document {i} talks about subject number {i} at length. " * 6)
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", KILLED, point], cwd=corpus, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = Retriever.load("idx")  # loads: files verified, keys of index and metadata equal
    docs = {k: v.fingerprint for k, v in after.documents().items()}
    if point == "after-commit":  # the commit happened: the whole update is there
        assert len(docs) == len(old) + 120 and all(docs[k] == v for k, v in old.items())
    else:  # the previous index, exactly
        assert docs == old and len(after) == len(before)
    assert sum(d.chunks for d in after.documents().values()) == len(after)
    # The next save clears what the killed one left behind.
    manifest = after.save("idx")
    assert sorted(os.listdir("idx")) == sorted(["meta.sqlite", manifest["vectors_file"], "write.lock"])
