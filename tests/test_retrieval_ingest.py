"""Reading documents, finding their headings and cutting them into token chunks whose
character offsets index the source text exactly."""

import json
import os

import pytest

from retrieval.chunking import RULE_LINE, ChunkingConfig, chunk_document
from retrieval.documents import Document, pydoc_documents, read_documents
from retrieval.encoder import SentenceEncoder
from retrieval.headings import sections
from tests.tiny_retrieval import CORPUS, save_tiny_encoder, write_corpus


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return SentenceEncoder.from_dir(save_tiny_encoder(str(tmp_path_factory.mktemp("encoder"))), batch_size=8)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(str(tmp_path / "docs"))


def test_markdown_headings_nest_and_skip_code_fences():
    text = CORPUS["guide.md"]
    found = sections(text, "markdown")
    assert [s.heading for s in found] == [
        "Garden guide", "Garden guide > Tomatoes", "Garden guide > Tomatoes > Pests", "Garden guide > Herbs",
    ]
    # The sections tile the text; each starts at its heading line.
    assert found[0].start == 0 and found[-1].end == len(text)
    assert all(a.end == b.start for a, b in zip(found, found[1:]))
    assert text[found[2].start :].startswith("### Pests") and text[found[3].start :].startswith("Herbs\n-----")
    assert "# not a heading" in text[found[1].start : found[1].end]  # inside the fence: still Tomatoes


def test_underlined_headings_follow_the_order_styles_appear_in():
    text = "Intro line\n\nTop\n***\n\nA\n===\n\nx\n\nA1\n---\n\ny\n\nB\n===\n\nz\n"
    assert [s.heading for s in sections(text, "underlined")] == [None, "Top", "Top > A", "Top > A > A1", "Top > B"]
    assert [s.heading for s in sections(text, "none")] == [None]


def test_pydoc_topics_are_documents_with_their_headings():
    docs = {d.doc_id: d for d in pydoc_documents()}
    from pydoc_data.topics import topics

    assert sorted(docs) == sorted(topics) and len(docs) == 79
    assert docs["nonlocal"].title == 'The "nonlocal" statement' and docs["nonlocal"].source == "pydoc:topics/nonlocal"
    headings = {s.heading for s in sections(docs["specialnames"].text, "underlined")}
    assert "Special method names > Customizing attribute access > Implementing Descriptors" in headings
    assert "Special method names > Emulating container types" in headings


def test_read_documents_ids_sources_and_metadata(corpus):
    docs = read_documents([corpus], root=corpus)
    assert [d.doc_id for d in docs] == ["guide.md", "notes/bikes.txt", "q-bread", "notes/faq.jsonl#3"]
    by_id = {d.doc_id: d for d in docs}
    assert by_id["guide.md"].heading_style == "markdown" and by_id["notes/bikes.txt"].heading_style == "underlined"
    assert by_id["q-bread"].metadata == {"lang": "en", "tags": ["baking"], "line": 1}
    assert by_id["notes/faq.jsonl#3"].metadata == {"lang": "en", "line": 3}
    assert by_id["q-bread"].source == "notes/faq.jsonl"
    # Line endings are kept, so offsets index the file's text.
    assert "\r\n" in by_id["notes/bikes.txt"].text
    # By default relative to the directory above the paths given: a file's own name, a folder's
    # name then its files' paths.
    assert read_documents([os.path.join(corpus, "guide.md")])[0].doc_id == "guide.md"
    # Another text field.
    path = os.path.join(corpus, "other.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"id": 7, "body": "Text here.", "text": 3}) + "\n")
    assert read_documents([path], text_field="body")[0].doc_id == "7"
    assert read_documents([path], text_field="body")[0].metadata == {"text": 3, "line": 1}


@pytest.mark.parametrize(
    "content, field, message",
    [
        ('{"text": "a"}\n{"text": "b"\n', "text", r"bad\.jsonl:2: not valid JSON"),
        ('{"body": "a", "id": 1}\n', "text", r"bad\.jsonl:1: no 'text' field \(fields: body, id\).*--text-field"),
        ('{"text": 5}\n', "text", r"bad\.jsonl:1: field 'text' must be a string, got int"),
        ('[1, 2]\n', "text", r"bad\.jsonl:1: expected a JSON object, got list"),
        ('{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n', "text", r"document id '1' comes twice"),
        ('{"text": "a", "id": true}\n', "text", r"bad\.jsonl:1: 'id' must be a non-empty string or an integer"),
        # valid JSON but no UTF-8 text: the tokenizer or SQLite raised an internal error
        ('{"text": "ok"}\n{"text": "a\\ud800b"}\n', "text", r"bad\.jsonl:2: field 'text' holds a lone surrogate \(U\+D800"),
        ('{"text": "a", "id": "x\\udfff"}\n', "text", r"bad\.jsonl:1: field 'id' holds a lone surrogate"),
        ('{"text": "a", "tags": ["x", {"k": "\\udc80"}]}\n', "text", r"field 'tags'\[1\]\.k holds a lone surrogate"),
    ],
)
def test_bad_jsonl_names_the_file_line_and_field(tmp_path, content, field, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_documents([str(path)], text_field=field)


def test_document_ids_do_not_depend_on_the_current_directory(corpus, tmp_path, monkeypatch):
    name = os.path.basename(corpus)
    expected = [f"{name}/guide.md", f"{name}/notes/bikes.txt", "q-bread", f"{name}/notes/faq.jsonl#3"]
    os.makedirs(tmp_path / "elsewhere")
    for cwd, path in [(corpus, "."), (os.path.dirname(corpus), name), (tmp_path / "elsewhere", corpus),
                      (os.path.join(corpus, "notes"), "..")]:
        monkeypatch.chdir(cwd)
        assert [d.doc_id for d in read_documents([path])] == expected, (cwd, path)
    # With a root (an index's), a subfolder's files keep the ids they got with their folder.
    root = os.path.dirname(corpus)
    monkeypatch.chdir(corpus)
    assert [d.doc_id for d in read_documents(["notes"], root=root)] == expected[1:]
    # A symlink to the folder reads as the folder.
    os.symlink(corpus, tmp_path / "link")
    assert [d.doc_id for d in read_documents([str(tmp_path / "link")], root=root)] == expected


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.md: no such file"):
        read_documents([str(tmp_path / "nowhere.md")])
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=r"x\.pdf: unsupported file type"):
        read_documents([str(tmp_path / "x.pdf")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        read_documents([str(tmp_path / "latin1.txt")])
    # A file name of other bytes than UTF-8 (Python gives them as lone surrogates): the tokenizer raised a TypeError
    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "fine.txt").write_text("fine")
    with open(os.path.join(os.fsencode(tmp_path / "names"), b"caf\xe9.txt"), "w") as f:
        f.write("text")
    with pytest.raises(ValueError, match=r"names/caf\\xe9\.txt: the file's path is not UTF-8"):
        read_documents([str(tmp_path / "names")])


def test_a_folder_is_read_without_its_pipes_and_dangling_links(tmp_path):
    # A named pipe called notes.md blocked `press index add` for good (holding the index's writer lock).
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\nreal text")
    os.mkfifo(tmp_path / "docs" / "pipe.md")
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "docs" / "gone.txt")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "b.md").write_text("linked text")
    os.symlink(tmp_path / "kept" / "b.md", tmp_path / "docs" / "link.md")  # a live link is read (its id: its target)
    assert [d.doc_id for d in read_documents([str(tmp_path / "docs")])] == ["docs/a.md", "kept/b.md"]


def _check_chunks(doc: Document, chunks, encoder, config: ChunkingConfig):
    spans = [s for s in encoder.token_spans(doc.text) if s[1] > s[0]]
    covered = set()
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text  # offsets map back exactly
        assert encoder.count_tokens(c.embed_text) <= config.chunk_tokens <= encoder.max_length - 2
        assert c.embed_text.startswith(c.context)
        section = next(s for s in sections(doc.text, doc.heading_style) if s.start <= c.start < s.end)
        assert c.end <= section.end and c.heading == section.heading  # never across a section boundary
        covered.update(range(c.start, c.end))
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    # Every token outside heading-underline lines is in some chunk.
    rules = [(m.start(), m.end()) for m in RULE_LINE.finditer(doc.text)]
    for a, b in spans:
        if not any(r0 <= a < r1 for r0, r1 in rules):
            assert a in covered, (doc.doc_id, doc.text[a:b])


def test_chunk_offsets_index_the_source_file(encoder, corpus):
    config = ChunkingConfig(chunk_tokens=24, overlap=6)
    docs = read_documents([corpus], root=corpus)
    for doc in docs:
        chunks = chunk_document(doc, encoder.token_spans, config, encoder.max_length - 2)
        assert chunks, doc.doc_id
        _check_chunks(doc, chunks, encoder, config)
        if doc.metadata.get("line") is None:  # a whole file: its bytes on disk, not only the parsed text
            with open(os.path.join(corpus, doc.doc_id), encoding="utf-8", newline="") as f:
                on_disk = f.read()
            assert all(on_disk[c.start : c.end] == c.text for c in chunks)
    guide = chunk_document(docs[0], encoder.token_spans, config, encoder.max_length - 2)
    assert {c.heading for c in guide} == {"Garden guide", "Garden guide > Tomatoes",
                                          "Garden guide > Tomatoes > Pests", "Garden guide > Herbs"}
    # Consecutive chunks of one long section overlap.
    tomatoes = [c for c in guide if c.heading == "Garden guide > Tomatoes"]
    assert len(tomatoes) >= 2 and all(b.start < a.end for a, b in zip(tomatoes, tomatoes[1:]))


def test_pydoc_chunks_index_the_topics_and_drop_underlines_from_embeddings(encoder):
    config = ChunkingConfig()
    for doc in [d for d in pydoc_documents() if d.doc_id in ("nonlocal", "specialnames", "formatstrings")]:
        chunks = chunk_document(doc, encoder.token_spans, config, encoder.max_length - 2)
        _check_chunks(doc, chunks, encoder, config)
        assert chunks[0].text.startswith(doc.title) and "*****" in chunks[0].text
        assert "*****" not in chunks[0].embed_text
        assert chunks[0].embed_text.startswith(doc.title + "\n")


def test_chunking_settings_are_checked():
    with pytest.raises(ValueError, match="chunk_tokens=300 exceeds what the encoder reads: 254 tokens"):
        ChunkingConfig(300, 10).validate(254)
    with pytest.raises(ValueError, match=r"overlap=60; it must be an integer in \[0, chunk_tokens/2\)"):
        ChunkingConfig(100, 60).validate()
    with pytest.raises(ValueError, match="chunk_tokens=4"):
        ChunkingConfig(4, 0).validate()
