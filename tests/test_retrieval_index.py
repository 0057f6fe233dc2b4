"""The retriever and its index directory, on a tiny random encoder: updates by document id,
USearch against exact search, atomic saves, damaged and mismatched files, threads."""

import os
import re
import shutil
import sqlite3
import threading
import warnings

import numpy as np
import pytest

from compress.sharding import make_mesh
from retrieval import store
from retrieval.chunking import ChunkingConfig
from retrieval.documents import Document, read_documents
from retrieval.encoder import SentenceEncoder
from retrieval.retriever import EncoderMismatchError, Retriever
from retrieval.store import IndexFileError
from retrieval.vector_index import IndexSettings, VectorIndex
from tests.reference import run_concurrently
from tests.tiny_retrieval import save_tiny_encoder, write_corpus

CHUNKING = ChunkingConfig(chunk_tokens=24, overlap=6)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return save_tiny_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return SentenceEncoder.from_dir(encoder_dir, batch_size=8)


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = write_corpus(str(tmp_path_factory.mktemp("docs")))
    return read_documents([root], root=root)


@pytest.fixture
def retriever(encoder, docs):
    r = Retriever(encoder, chunking=CHUNKING)
    r.add(docs)
    return r


def _state(r: Retriever) -> dict:
    """Everything a search can see: documents and every chunk's key, text and vector."""
    keys, vectors = r._vectors.vectors()
    chunks = r._metadata.chunks(keys)
    assert sorted(chunks) == sorted(int(k) for k in keys) == r._metadata.keys()  # index and metadata agree
    return {"documents": {k: v.fingerprint for k, v in r.documents().items()},
            "chunks": {k: (c.doc_id, c.text, c.start, c.end) for k, c in chunks.items()},
            "keywords": {w: r._metadata.lexical_search(w, 100) for w in ("garden", "tomatoes", "chain", "bread")},
            "vectors": {int(k): v.round(5).tolist() for k, v in zip(keys, vectors)}}


def test_sharded_encoding_equals_single_device(encoder, encoder_dir):
    import jax

    assert encoder.mesh is not None and encoder.mesh.shape["data"] == len(jax.devices()) == 8
    single = SentenceEncoder.from_dir(encoder_dir, batch_size=8, mesh=make_mesh(1, 1, 1, jax.devices()[:1]))
    texts = [f"sentence number {i} about {'gardens' if i % 2 else 'bicycles'}" for i in range(11)]
    # Parameters on all 8 devices, each batch's rows split over them.
    assert len(jax.tree.leaves(encoder.params)[0].sharding.device_set) == 8
    assert encoder._rows.spec[0] is not None and single.mesh.size == 1
    np.testing.assert_allclose(encoder.encode(texts), single.encode(texts), atol=1e-5)


def test_search_finds_each_chunk_by_its_own_text(retriever, docs):
    for doc in docs:
        for chunk in retriever.chunk(doc):
            top = retriever.search(chunk.embed_text, 1, hybrid=False)[0]
            assert (top.doc_id, top.start, top.end, top.text) == (doc.doc_id, chunk.start, chunk.end, chunk.text)
            assert top.score == pytest.approx(1.0, abs=1e-4)
            assert top.source == doc.source and top.heading == chunk.heading


def test_exact_search_equals_numpy_reference(retriever, encoder, docs):
    query = "how do I look after a bicycle chain"
    # The reference: embed every chunk again and rank by dot product.
    chunks = [c for d in docs for c in retriever.chunk(d)]
    key_of = {(c.doc_id, c.start): r.key for c in chunks
              for r in [retriever.search(c.embed_text, 1, exact=True, hybrid=False)[0]]}
    matrix = encoder.encode([c.embed_text for c in chunks])  # [n, D]
    scores = matrix @ encoder.encode([query])[0]  # [n]
    want = [key_of[(chunks[i].doc_id, chunks[i].start)] for i in np.argsort(-scores)[:5]]
    got = retriever.search(query, 5, exact=True, hybrid=False)
    assert [h.key for h in got] == want
    np.testing.assert_allclose([h.score for h in got], np.sort(scores)[::-1][:5], atol=1e-5)


def test_usearch_agrees_with_exact_search():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:200] + 0.3 * rng.standard_normal((200, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = VectorIndex(32, IndexSettings(connectivity=16, expansion_add=128, expansion_search=128))
    index.add(np.arange(3000, dtype=np.uint64) + 10, vectors)
    approx_keys, approx_scores = index.search(queries, 10)
    exact_keys, exact_scores = index.search(queries, 10, exact=True)
    # The exact search is NumPy's ranking of the stored vectors.
    reference = np.argsort(-(queries @ vectors.T), axis=1)[:, :10] + 10
    np.testing.assert_array_equal(exact_keys, reference)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_keys, exact_keys)])
    assert recall >= 0.98, recall
    # Where both found a key, they score it the same.
    for a_keys, a_scores, e_keys, e_scores in zip(approx_keys, approx_scores, exact_keys, exact_scores):
        exact_of = dict(zip(e_keys.tolist(), e_scores.tolist()))
        for k, s in zip(a_keys.tolist(), a_scores.tolist()):
            if k in exact_of:
                assert s == pytest.approx(exact_of[k], abs=1e-5)


def test_retriever_usearch_equals_exact_on_a_small_corpus(retriever):
    for query in ["tomatoes need sun", "brake pads", "why does bread rise slowly", "comet tail"]:
        for hybrid in (False, True):
            approx = retriever.search(query, 5, hybrid=hybrid)
            exact = retriever.search(query, 5, exact=True, hybrid=hybrid)
            assert [h.key for h in approx] == [h.key for h in exact]
            np.testing.assert_allclose([h.score for h in approx], [h.score for h in exact], atol=1e-5)


def test_hybrid_ranking_fuses_nearest_chunks_and_keyword_matches(retriever):
    from retrieval.retriever import RRF_K

    query = "Why is sourdough slow?"
    dense = retriever.search(query, 50, exact=True, hybrid=False)  # every chunk, by cosine
    lexical = retriever._metadata.lexical_search(query, 50)
    assert lexical[0] == next(h.key for h in dense if h.doc_id == "q-bread")  # the only chunk saying 'sourdough'
    fused = {h.key: 1 / (RRF_K + i) for i, h in enumerate(dense, start=1)}
    for i, key in enumerate(lexical, start=1):
        fused[key] += 1 / (RRF_K + i)
    want = sorted(fused, key=lambda key: -fused[key])[:5]
    got = retriever.search(query, 5, exact=True)
    assert [h.key for h in got] == want and got[0].doc_id == "q-bread"
    cosine = {h.key: h.score for h in dense}
    assert all(h.score == pytest.approx(cosine[h.key], abs=1e-5) for h in got)  # scores stay cosines
    # Keyword matches come from the stored chunks only: nothing matches a word no chunk has.
    assert retriever._metadata.lexical_search("xylophone", 5) == []


@pytest.mark.parametrize("dtype", ["f16", "i8"])
def test_compact_dtypes_keep_the_ranking_roughly_and_survive_a_save(encoder, docs, dtype, tmp_path):
    r = Retriever(encoder, chunking=CHUNKING, settings=IndexSettings(dtype=dtype))
    r.add(docs)
    chunk = r.chunk(docs[0])[1]
    assert r.search(chunk.embed_text, 1, hybrid=False)[0].start == chunk.start
    r.save(str(tmp_path / "idx"))
    loaded = Retriever.load(str(tmp_path / "idx"), encoder=encoder)
    assert loaded.settings.dtype == dtype and len(loaded) == len(r)
    assert [h.key for h in loaded.search("tyre pressure", 3)] == [h.key for h in r.search("tyre pressure", 3)]


def test_remove_drops_every_chunk_of_a_document(retriever):
    before = len(retriever)
    guide_chunks = retriever.documents()["guide.md"].chunks
    assert guide_chunks >= 3
    assert retriever.remove(["guide.md"]) == guide_chunks
    assert len(retriever) == before - guide_chunks and "guide.md" not in retriever.documents()
    for query in ["tomatoes", "aphids on leaves", "basil", "Garden guide"]:
        for exact in (False, True):
            assert all(h.doc_id != "guide.md" for h in retriever.search(query, len(retriever), exact=exact))
    _state(retriever)
    with pytest.raises(KeyError, match=r"no document with id 'nope', 'guide.md'"):
        retriever.remove(["notes/bikes.txt", "nope", "guide.md"])
    assert "notes/bikes.txt" in retriever.documents()  # nothing removed


def test_readding_replaces_a_changed_document_and_skips_an_unchanged_one(retriever, docs):
    old = retriever.documents()["notes/bikes.txt"]
    again = retriever.add(docs)
    assert again.unchanged == tuple(d.doc_id for d in docs) and again.chunks == 0
    changed = Document("notes/bikes.txt", "Bicycle maintenance\n===================\n\nA new text about saddles only.\n",
                       "notes/bikes.txt", "bikes", "underlined")
    report = retriever.add([changed])
    assert report.replaced == ("notes/bikes.txt",) and report.added == () and report.chunks == 1
    assert retriever.documents()["notes/bikes.txt"].chunks == 1 != old.chunks
    texts = [h.text for h in retriever.search("chain oil tyre pressure brakes", len(retriever))
             if h.doc_id == "notes/bikes.txt"]
    assert len(texts) == 1 and "saddles" in texts[0]
    _state(retriever)


def test_a_failed_add_loses_nothing(retriever, docs, monkeypatch):
    before = _state(retriever)
    before_guide_chunks = retriever.documents()["guide.md"].chunks
    changed = Document("guide.md", "# Garden guide\n\nEverything about cacti now.\n", "guide.md", "guide", "markdown")
    new = Document("new.txt", "A new document about kites and wind.", "new.txt", "new", "underlined")
    real_add = retriever._vectors._index.add

    def add_half_then_fail(keys, vectors, **kwargs):
        real_add(keys[:1], vectors[:1], **kwargs)  # some vectors are in when it fails
        raise MemoryError("injected: the vector index failed mid-add")

    monkeypatch.setattr(retriever._vectors._index, "add", add_half_then_fail)
    with pytest.raises(MemoryError, match="injected"):
        retriever.add([changed, new])
    monkeypatch.undo()
    assert _state(retriever) == before

    # A failure after the old chunks of the replaced document were removed from the vectors.
    real_remove = retriever._vectors._index.remove
    failures = []

    def remove_then_fail(keys, **kwargs):
        real_remove(keys, **kwargs)
        if not failures:  # once: the clean-up after it removes normally
            failures.append(keys)
            raise RuntimeError("injected: failed after removing")

    monkeypatch.setattr(retriever._vectors._index, "remove", remove_then_fail)
    with pytest.raises(RuntimeError, match="after removing"):
        retriever.add([changed, new])
    monkeypatch.undo()
    assert len(failures[0]) == before_guide_chunks and _state(retriever) == before

    # A failure while embedding (before anything is touched).
    calls = []

    def encode_fails(texts):
        calls.append(len(texts))
        raise ValueError("injected: encoder failure")

    monkeypatch.setattr(retriever.encoder, "encode", encode_fails)
    with pytest.raises(ValueError, match="encoder failure"):
        retriever.add([changed, new])
    monkeypatch.undo()
    assert calls and _state(retriever) == before
    # And the index still takes the same update afterwards.
    assert retriever.add([changed, new]).chunks >= 2


def test_save_and_load_round_trip_and_view(retriever, encoder, tmp_path):
    directory = str(tmp_path / "idx")
    manifest = retriever.save(directory)
    files = sorted(os.listdir(directory))
    assert files == ["meta.sqlite", manifest["vectors_file"], "write.lock"]
    assert manifest["vectors_sha256"] == store.sha256_file(os.path.join(directory, manifest["vectors_file"]))
    assert manifest["vectors_count"] == len(retriever) and manifest["encoder"] == encoder.name
    for view in (False, True):
        loaded = Retriever.load(directory, view=view)  # loads the encoder named in the index
        assert loaded.read_only == view and _state(loaded) == _state(retriever)
        for query in ["bread", "chain", "aphids"]:  # the same hits; scores as close as two encoders' floats
            got, want = loaded.search(query, 4), retriever.search(query, 4)
            assert [h.key for h in got] == [h.key for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    with pytest.raises(PermissionError, match="view=True"):
        loaded.add([Document("x", "some text", "x")])
    with pytest.raises(PermissionError, match="view=True"):
        loaded.remove(["guide.md"])
    # An update saves under a new vectors file and deletes the old one.
    retriever.remove(["q-bread"])
    second = retriever.save(directory)
    assert sorted(os.listdir(directory)) == ["meta.sqlite", second["vectors_file"], "write.lock"] != files
    assert "q-bread" not in Retriever.load(directory, encoder=encoder).documents()


def test_empty_index_saves_loads_and_finds_nothing(encoder, tmp_path):
    r = Retriever(encoder)
    assert r.search("anything", 3) == []
    r.save(str(tmp_path / "empty"))
    assert Retriever.load(str(tmp_path / "empty"), encoder=encoder).search("anything", 3) == []


@pytest.fixture
def saved(retriever, tmp_path):
    directory = str(tmp_path / "idx")
    manifest = retriever.save(directory)
    return directory, os.path.join(directory, manifest["vectors_file"])


def test_corrupted_vectors_file_is_refused_naming_it(saved, encoder):
    directory, path = saved
    with open(path, "r+b") as f:  # flip bytes in the middle: same size, other content
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(IndexFileError, match=rf"{path}: sha256 .* differs from the manifest.*corrupted"):
        Retriever.load(directory, encoder=encoder)


def test_truncated_or_missing_vectors_file_is_refused_naming_it(saved, encoder):
    directory, path = saved
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(IndexFileError, match=rf"{path}: {size - 100} bytes, the manifest records {size}"):
        Retriever.load(directory, encoder=encoder)
    os.unlink(path)
    with pytest.raises(IndexFileError, match=rf"{path}: the vectors file named in the manifest is missing"):
        Retriever.load(directory, encoder=encoder)


def test_vectors_file_of_another_index_is_refused(saved, encoder, docs, tmp_path):
    directory, path = saved
    other = Retriever(encoder, chunking=CHUNKING)
    other.add(docs[:1])
    other_manifest = other.save(str(tmp_path / "other"))
    shutil.copy(os.path.join(tmp_path / "other", other_manifest["vectors_file"]), path)
    with pytest.raises(IndexFileError, match=re.escape(path)):
        Retriever.load(directory, encoder=encoder)


def test_damaged_metadata_store_is_refused_naming_it(saved, encoder):
    directory, _ = saved
    meta = os.path.join(directory, "meta.sqlite")
    with open(meta, "r+b") as f:
        f.write(b"this is not sqlite" * 8)
    with pytest.raises(IndexFileError, match=rf"{meta}: the metadata store cannot be read"):
        Retriever.load(directory, encoder=encoder)
    with pytest.raises(FileNotFoundError, match="not a press index"):
        Retriever.load(os.path.dirname(directory), encoder=encoder)


def test_every_damaged_page_of_the_metadata_store_is_refused_naming_it(saved, retriever, encoder):
    directory, _ = saved
    meta = os.path.join(directory, "meta.sqlite")
    with open(meta, "rb") as f:
        original = f.read()
    page = int.from_bytes(original[16:18], "big")  # the page size, from the SQLite header
    expected, refused = _state(retriever), 0
    for start in range(0, len(original), page):
        for offset in (8, page - 96):  # in the page header; among the cells, which fill pages from the end
            damaged = bytearray(original)
            damaged[start + offset : start + offset + 16] = bytes(b ^ 0xFF for b in damaged[start + offset :][:16])
            with open(meta, "wb") as f:
                f.write(damaged)
            try:
                loaded = Retriever.load(directory, encoder=encoder)
            except IndexFileError as e:
                assert str(e).startswith(f"{meta}: ") and "\n" not in str(e) and "rebuild" in str(e), str(e)
                refused += 1
                continue
            assert _state(loaded) == expected, (start, offset)  # bytes no row uses (free space): nothing changed
    assert refused >= len(original) // page  # most damage is caught


def _edit(meta: str, sql: str, *args) -> None:
    db = sqlite3.connect(meta)
    with db:
        db.execute(sql, args)
    db.close()


def test_an_edited_chunk_or_manifest_is_refused_naming_the_file(saved, retriever, encoder):
    directory, _ = saved
    meta = os.path.join(directory, "meta.sqlite")
    with open(meta, "rb") as f:
        original = f.read()
    # SQLite finds nothing wrong with these: only the checksum recorded at save does.
    for sql, args, message in [
        ("UPDATE chunks SET text = ? WHERE key = (SELECT MIN(key) FROM chunks)", ("Plant tomatoes in the shade.",),
         "its manifest, documents or chunks differ from the checksum recorded when it was saved"),
        ("UPDATE documents SET title = ? WHERE doc_id = 'q-bread'", ("Bread",), "differ from the checksum"),
        ("UPDATE manifest SET value = 'true' WHERE name = 'exact'", (), "differ from the checksum"),
        ("UPDATE manifest SET value = ? WHERE name = 'dim'", ('{"oops',), "manifest entry 'dim' is not valid JSON"),
    ]:
        _edit(meta, sql, *args)
        with pytest.raises(IndexFileError, match=f"^{re.escape(meta)}: .*{message}"):
            Retriever.load(directory, encoder=encoder)
        with open(meta, "wb") as f:
            f.write(original)
    assert _state(Retriever.load(directory, encoder=encoder)) == _state(retriever)


def test_index_files_are_created_with_the_same_mode(retriever, tmp_path):
    umask = os.umask(0o027)
    try:
        for _ in range(2):  # a new index, then an update
            manifest = retriever.save(str(tmp_path / "idx"))
            retriever.remove([sorted(retriever.documents())[0]])
            modes = {name: os.stat(tmp_path / "idx" / name).st_mode & 0o777
                     for name in ("meta.sqlite", manifest["vectors_file"])}
            assert set(modes.values()) == {0o644 & ~0o027}, modes
    finally:
        os.umask(umask)


def test_an_index_of_format_1_loads_with_a_warning_and_is_upgraded_by_a_save(saved, retriever, encoder):
    directory, _ = saved
    meta = os.path.join(directory, "meta.sqlite")
    _edit(meta, "DELETE FROM manifest WHERE name IN ('revision', 'docs_root', 'metadata_sha256')")
    _edit(meta, "UPDATE manifest SET value = '1' WHERE name = 'format'")
    with pytest.warns(UserWarning, match=rf"{re.escape(meta)}: saved by an older press \(index format 1\).*unverified"):
        loaded = Retriever.load(directory, encoder=encoder)
    assert _state(loaded) == _state(retriever) and loaded.index_format == 1 and loaded.docs_root is None
    assert loaded.save(directory)["format"] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _state(Retriever.load(directory, encoder=encoder)) == _state(retriever)


def test_another_encoder_is_refused(saved, encoder_dir, tmp_path):
    directory, _ = saved
    other_seed = SentenceEncoder.from_dir(save_tiny_encoder(str(tmp_path / "seed1"), seed=1), batch_size=8)
    with pytest.raises(EncoderMismatchError, match=r"meta\.sqlite: built with encoder .* embeds differently"):
        Retriever.load(directory, encoder=other_seed)
    wider = SentenceEncoder.from_dir(save_tiny_encoder(str(tmp_path / "wide"), hidden_size=48), batch_size=8)
    with pytest.raises(EncoderMismatchError, match=r"holds 32-dimensional vectors .* makes 48-dimensional ones"):
        Retriever.load(directory, encoder=wider)
    # The same weights under another name are the same encoder.
    shutil.copytree(encoder_dir, str(tmp_path / "copy"))
    Retriever.load(directory, encoder=SentenceEncoder.from_dir(str(tmp_path / "copy"), batch_size=8))


def test_a_new_index_is_not_written_over_other_files(retriever, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty and holds no press index"):
        retriever.save(str(tmp_path / "mine"))


def test_concurrent_searches_and_updates(retriever, docs):
    queries = ["tomatoes", "chain oil", "sourdough", "comet", "brakes", "basil", "aphids", "tyres"]
    expected = {q: [(h.key, h.text) for h in retriever.search(q, 3)] for q in queries}
    # Many threads searching at once get what one thread gets.
    results, errors = run_concurrently(lambda i: [(h.key, h.text) for h in retriever.search(queries[i % 8], 3)], 16)
    assert not errors and all(results[i] == expected[queries[i % 8]] for i in range(16))

    # Searches running while another thread removes and re-adds a document always see a
    # consistent index: every hit's text is its stored chunk, never a half-applied update.
    stop = threading.Event()
    update_errors = []

    def updater():
        try:
            for _ in range(6):
                retriever.remove(["notes/bikes.txt"])
                retriever.add([d for d in docs if d.doc_id == "notes/bikes.txt"])
        except Exception as e:  # noqa: BLE001
            update_errors.append(e)
        finally:
            stop.set()

    def searcher(i):
        seen = 0
        while not stop.is_set():
            for h in retriever.search(queries[i % 8], 5):
                assert h.text == next(c.text for d in docs if d.doc_id == h.doc_id
                                      for c in retriever.chunk(d) if c.start == h.start)
                seen += 1
        return seen

    thread = threading.Thread(target=updater)
    thread.start()
    results, errors = run_concurrently(searcher, 4)
    thread.join()
    assert not errors and not update_errors and all(n > 0 for n in results.values())
    _state(retriever)
    assert {q: [h.text for h in retriever.search(q, 3)] for q in queries} == {
        q: [t for _, t in v] for q, v in expected.items()}

