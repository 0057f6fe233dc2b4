"""Documents to index: read from text, Markdown and JSONL files, directories, or the
bundled CPython language reference.

  read_documents(["notes/", "faq.jsonl", "README.md", "pydoc:topics"])

Sources, and the document id each one gets:

  *.txt, *.text, *.rst   one document per file, id = the file's path relative to `root`
                         (see below). Underlined (reStructuredText-style) headings are
                         tracked.
  *.md, *.markdown       the same, with Markdown headings tracked.
  *.jsonl                one document per non-blank line (a JSON object): its `text_field`
                         (default "text") is the text, an "id" field (string or integer) is
                         the id (else `PATH#LINE`, 1-based), a "title" field the title, and
                         every other field is kept as metadata. The line number is kept as
                         metadata "line".
  a directory            every file above found under it, recursively, in sorted order;
                         hidden files and directories (".name") are skipped, and so is
                         whatever is not a regular file (a named pipe, a dangling link).
  pydoc:topics           `pydoc_data.topics.topics`, the CPython language reference shipped
                         with Python: one document per topic, id = the topic name
                         ("nonlocal", "assignment", ...), source "pydoc:topics/NAME".

Ids of files do not depend on the current directory: paths are resolved (symlinks too)
and taken relative to `root`, by default `document_root(paths)`, the deepest directory
holding the parent of every path given, so a folder's name starts its files' ids:
`notes/`, `./notes`, `/home/me/notes` and `.` inside notes/ all give `notes/a.md`. An index
records the root of the first files added to it (Retriever.docs_root; Document.root
carries it) and refuses documents read against another one; `press index add` reads with
the index's root, so re-adding the same files from anywhere replaces or skips them. Files
outside the root get ids starting `../`.

Files are read as UTF-8 with their line endings kept, so the character offsets of chunks
index the file's text exactly (`open(path, newline="").read()[start:end]`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Iterable, Iterator

from compress.errors import InputError, check_json_unicode
from compress.data import corpus

PYDOC_TOPICS = "pydoc:topics"
TEXT_SUFFIXES = (".txt", ".text", ".rst")
MARKDOWN_SUFFIXES = (".md", ".markdown")
JSONL_SUFFIXES = (".jsonl",)
SURROGATE_HINT = "a \\u escape of a surrogate must pair a high one with a low one"


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: its text and where it came from.

    heading_style is how headings are marked in `text` (see retrieval/headings.py).
    """

    doc_id: str  # unique in an index; adding a document with the same id replaces it
    text: str
    source: str  # a file path, or pydoc:topics/NAME
    title: str | None = None  # shown with its chunks; also prefixed to them when embedded
    heading_style: str = "none"  # 'markdown', 'underlined' or 'none'
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-serialisable
    root: str | None = None  # the directory doc_id is a path relative to; None when it is no path

    def fingerprint(self) -> str:
        """sha256 of everything that decides this document's chunks: an unchanged document is not re-embedded."""
        h = hashlib.sha256()
        for part in (self.text, self.source, self.title or "", self.heading_style,
                     json.dumps(self.metadata, sort_keys=True, ensure_ascii=False)):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        return h.hexdigest()


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it or leave it out") from None


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def read_text_file(path: str, doc_id: str, root: str | None = None) -> Document:
    """A .txt/.md file as one document (the heading style follows the suffix); doc_id is relative to root."""
    markdown = path.lower().endswith(MARKDOWN_SUFFIXES)
    return Document(doc_id, _read_text(path), doc_id, _stem(path), "markdown" if markdown else "underlined",
                    root=root)


def read_jsonl_file(path: str, rel: str, text_field: str = "text", root: str | None = None) -> Iterator[Document]:
    """One document per non-blank line of a JSONL file; errors name the file, line and field.

    rel: the file's path relative to root, the source of its documents and the id of those without one.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise InputError(f"{where}: not UTF-8 (byte {e.start}: {e.reason})") from None
            except ValueError as e:
                raise InputError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if text_field not in obj:
                raise InputError(f"{where}: no {text_field!r} field (fields: {', '.join(sorted(obj)) or 'none'}); "
                                 "pass --text-field NAME to read another one")
            text = obj[text_field]
            if not isinstance(text, str):
                raise InputError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
            doc_id, id_root = obj.get("id"), None
            if doc_id is None:
                doc_id, id_root = f"{rel}#{number}", root
            elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or doc_id == "":
                raise InputError(f"{where}: 'id' must be a non-empty string or an integer, got {doc_id!r}")
            title = obj.get("title") if isinstance(obj.get("title"), str) else None
            for key, value in obj.items():  # the text, id, title and metadata alike
                check_json_unicode(key, f"{where}: a field's name", SURROGATE_HINT)
                check_json_unicode(value, f"{where}: field {key!r}", SURROGATE_HINT)
            metadata = {k: v for k, v in obj.items() if k not in (text_field, "id")}
            metadata["line"] = number
            yield Document(str(doc_id), text, rel, title, "none", metadata, id_root)


def pydoc_documents() -> list[Document]:
    """The CPython language reference shipped with Python: one document per topic."""
    docs = []
    for name, text in corpus.pydoc_topics().items():
        first = text.lstrip().split("\n", 1)[0].strip()
        docs.append(Document(name, text, f"{PYDOC_TOPICS}/{name}", first or name, "underlined"))
    return docs


def _walk(directory: str) -> Iterator[str]:
    """The files to read under `directory`: regular files (or links to them) of a known suffix. A
    named pipe called notes.md would block its reader for good, holding the index's writer lock
    all the while, and a dangling link cannot be read: both are passed over."""
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(current, name)
            if not name.startswith(".") and name.lower().endswith(TEXT_SUFFIXES + MARKDOWN_SUFFIXES + JSONL_SUFFIXES) \
                    and os.path.isfile(path):
                yield path


def check_path(path: str) -> None:
    """Raise FileNotFoundError naming `path` unless it is a file, directory or pydoc:topics."""
    if path != PYDOC_TOPICS and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (pass files, directories or {PYDOC_TOPICS})")


def document_root(paths: Iterable[str]) -> str | None:
    """The default root of file ids: the deepest directory holding the parent of every (resolved)
    path given; None if there are only pydoc:topics. Independent of the current directory."""
    parents = [os.path.dirname(os.path.realpath(p)) for p in paths if p != PYDOC_TOPICS]
    return os.path.commonpath(parents) if parents else None


def read_path(path: str, *, text_field: str = "text", root: str | None = None) -> Iterator[Document]:
    """The documents of one file, directory or `pydoc:topics` (see the module docstring).

    root: file ids are paths relative to it; default document_root([path]).
    """
    if path == PYDOC_TOPICS:
        yield from pydoc_documents()
        return
    check_path(path)
    root = os.path.realpath(root) if root is not None else document_root([path])
    files = list(_walk(path)) if os.path.isdir(path) else [path]
    for file in files:
        rel = os.path.relpath(os.path.realpath(file), root)
        _check_name(file, rel)
        lower = file.lower()
        if lower.endswith(JSONL_SUFFIXES):
            yield from read_jsonl_file(file, rel, text_field, root)
        elif lower.endswith(TEXT_SUFFIXES + MARKDOWN_SUFFIXES):
            yield read_text_file(file, rel, root)
        else:
            suffixes = ", ".join(TEXT_SUFFIXES + MARKDOWN_SUFFIXES + JSONL_SUFFIXES)
            raise InputError(f"{file}: unsupported file type; press reads {suffixes} (or a directory of them)")


def _check_name(file: str, rel: str) -> None:
    """InputError unless the file's path (its documents' id and source) is UTF-8: Python gives a name
    of other bytes as lone surrogates, which no tokenizer or SQLite text takes (a TypeError deep in
    the tokenizer was the index's answer)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(file).decode("utf-8", "backslashreplace")
        raise InputError(f"{shown}: the file's path is not UTF-8 (its documents' ids are their paths); rename it "
                         "or leave it out") from None



def read_documents(paths: Iterable[str], *, text_field: str = "text", root: str | None = None) -> list[Document]:
    """All documents of `paths` in order; two documents with one id is an error naming both.

    root: file ids are paths relative to it; default document_root(paths).
    """
    paths = list(paths)
    root = root if root is not None else document_root(paths)
    docs, seen = [], {}
    for path in paths:
        for doc in read_path(path, text_field=text_field, root=root):
            if doc.doc_id in seen:
                raise InputError(f"document id {doc.doc_id!r} comes twice: from {seen[doc.doc_id]} and {doc.source}; "
                                 "ids must be unique (JSONL: give each line its own 'id')")
            seen[doc.doc_id] = doc.source
            docs.append(doc)
    return docs
