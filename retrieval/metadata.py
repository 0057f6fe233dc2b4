"""The metadata store: a SQLite database mapping vector keys to chunks, documents to their
chunks, and holding the index's manifest.

Tables:

  manifest(name TEXT PRIMARY KEY, value TEXT)        one JSON value per name (see store.py)
  documents(doc_id TEXT PRIMARY KEY, source, title, fingerprint, chunks INTEGER)
  chunks(key INTEGER PRIMARY KEY, doc_id, ordinal, text, source, heading, start, end,
         metadata TEXT)                              one row per vector; metadata is JSON
  chunks_fts                                         an FTS5 full-text index of the chunks'
                                                     heading and text (Porter stemming), kept
                                                     in step with `chunks` by triggers, for
                                                     BM25 keyword search

Reading the file checks it before anything is served from it: SQLite's quick_check (the
file's structure), that every manifest value parses, and, unless the caller opts out, the
checksum of the manifest, documents and chunks that the save recorded (manifest entry
DIGEST_KEY: sha256 over their rows in key order, so an edited chunk text or a flipped byte
in a row is caught, which no SQLite check does) and the FTS5 index against the chunks.
Damage raises InputError naming the file.

The live store is an in-memory database (copied from and to the file with SQLite's backup
API), so updates never touch the file until an atomic save, and a failed update rolls back
inside a transaction. One lock guards the connection: SQLite connections are not shared
between threads by the standard library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import sqlite3
import threading
from typing import Any, Iterable, Iterator

from compress.errors import InputError
from retrieval.chunking import Chunk

SCHEMA = """
CREATE TABLE IF NOT EXISTS manifest (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
  doc_id TEXT PRIMARY KEY, source TEXT NOT NULL, title TEXT, fingerprint TEXT NOT NULL, chunks INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
  key INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, ordinal INTEGER NOT NULL, text TEXT NOT NULL,
  source TEXT NOT NULL, heading TEXT, start INTEGER NOT NULL, end INTEGER NOT NULL, metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_doc ON chunks (doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
  heading, text, content='chunks', content_rowid='key', tokenize='porter unicode61'
);
CREATE TRIGGER IF NOT EXISTS chunks_fts_insert AFTER INSERT ON chunks BEGIN
  INSERT INTO chunks_fts (rowid, heading, text) VALUES (new.key, new.heading, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_fts_delete AFTER DELETE ON chunks BEGIN
  INSERT INTO chunks_fts (chunks_fts, rowid, heading, text) VALUES ('delete', old.key, old.heading, old.text);
END;
"""
TABLES = ("manifest", "documents", "chunks", "chunks_fts")
DIGEST_KEY = "metadata_sha256"  # the manifest entry holding content_digest() as saved
# What content_digest() hashes, in this order: every row that decides what a search returns.
DIGESTED = (
    ("manifest", f"SELECT name, value FROM manifest WHERE name != '{DIGEST_KEY}' ORDER BY name"),
    ("documents", "SELECT doc_id, source, title, fingerprint, chunks FROM documents ORDER BY doc_id"),
    ("chunks", "SELECT key, doc_id, ordinal, text, source, heading, start, end, metadata FROM chunks ORDER BY key"),
)
REBUILD = "rebuild the index with press index build"


@dataclasses.dataclass(frozen=True)
class ChunkRecord:
    """A stored chunk (what a search hit carries)."""

    key: int
    doc_id: str
    ordinal: int
    text: str
    source: str
    heading: str | None
    start: int
    end: int
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DocumentRecord:
    doc_id: str
    source: str
    title: str | None
    fingerprint: str
    chunks: int


class MetadataStore:
    """Chunks, documents and the manifest, in an in-memory SQLite database."""

    def __init__(self, connection: sqlite3.Connection | None = None):
        self._db = connection or sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        with self._lock:
            self._db.executescript(SCHEMA)

    @classmethod
    def read(cls, path: str, *, verify: bool = True) -> MetadataStore:
        """Copy the database file at `path` into memory and check it (see the module docstring).

        Args:
          verify: also recompute the checksum (when the manifest records one) and check the
            keyword index against the chunks; both read every row.
        Raises InputError naming `path` if it is not a metadata store or is damaged.
        """
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                missing = [t for t in TABLES if t not in tables]
                if missing:
                    raise InputError(f"{path}: not a press index metadata store (tables {', '.join(missing)} missing)")
                memory = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                source.backup(memory)
            finally:
                source.close()
            try:
                _check(memory, path, verify)
                return cls(memory)
            except BaseException:
                memory.close()
                raise
        except sqlite3.DatabaseError as e:
            raise InputError(f"{path}: the metadata store cannot be read ({_one_line(e)}); the index directory is "
                             f"damaged, {REBUILD}") from None

    def write(self, path: str) -> None:
        """Copy the whole database into the file at `path` (new or empty; its mode is kept)."""
        with self._lock:
            target = sqlite3.connect(path)
            try:
                self._db.backup(target)
            finally:
                target.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or, on an exception, not at all."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- the manifest

    @staticmethod
    def read_manifest_entry(path: str, name: str) -> Any:
        """One manifest value of the database file at `path`, without copying the file (None if absent).

        Raises InputError naming `path` if it cannot be read.
        """
        try:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                row = source.execute("SELECT value FROM manifest WHERE name = ?", (name,)).fetchone()
            finally:
                source.close()
            return None if row is None else json.loads(row[0])
        except (sqlite3.DatabaseError, ValueError) as e:
            raise InputError(f"{path}: the metadata store cannot be read ({_one_line(e)})") from None

    def manifest(self) -> dict[str, Any]:
        with self._lock:
            return {name: json.loads(value) for name, value in self._db.execute("SELECT name, value FROM manifest")}

    def set_manifest(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO manifest VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in values.items()])

    def content_digest(self) -> str:
        """sha256 of the manifest (all but DIGEST_KEY), documents and chunks: what a save records."""
        with self._lock:
            return _digest(self._db)

    # --- documents and chunks

    def documents(self) -> dict[str, DocumentRecord]:
        with self._lock:
            rows = self._db.execute("SELECT doc_id, source, title, fingerprint, chunks FROM documents").fetchall()
        return {r[0]: DocumentRecord(*r) for r in rows}

    def chunk_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def keys(self, doc_ids: Iterable[str] | None = None) -> list[int]:
        """Keys of the chunks of `doc_ids` (all chunks when None), ascending."""
        with self._lock:
            if doc_ids is None:
                return [r[0] for r in self._db.execute("SELECT key FROM chunks ORDER BY key")]
            out = []
            for doc_id in doc_ids:
                out += [r[0] for r in self._db.execute("SELECT key FROM chunks WHERE doc_id = ?", (doc_id,))]
            return sorted(out)

    def put_document(self, doc_id: str, source: str, title: str | None, fingerprint: str,
                     chunks: list[Chunk], keys: list[int]) -> None:
        """Replace document `doc_id` (and all its chunks) with these chunks under these keys."""
        with self._lock:
            self.delete_documents([doc_id])
            self._db.execute("INSERT INTO documents VALUES (?, ?, ?, ?, ?)",
                             (doc_id, source, title, fingerprint, len(chunks)))
            self._db.executemany(
                "INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(key, c.doc_id, c.ordinal, c.text, c.source, c.heading, c.start, c.end,
                  json.dumps(c.metadata, ensure_ascii=False)) for key, c in zip(keys, chunks)],
            )

    def delete_documents(self, doc_ids: Iterable[str]) -> None:
        with self._lock:
            for doc_id in doc_ids:
                self._db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
                self._db.execute("DELETE FROM documents WHERE doc_id = ?", (doc_id,))

    def chunks(self, keys: Iterable[int]) -> dict[int, ChunkRecord]:
        """The stored chunks of `keys` (keys not stored are left out)."""
        keys = [int(k) for k in keys]
        out: dict[int, ChunkRecord] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # SQLite caps the number of bound parameters
                part = keys[start : start + 500]
                rows = self._db.execute(
                    f"SELECT key, doc_id, ordinal, text, source, heading, start, end, metadata FROM chunks "
                    f"WHERE key IN ({', '.join('?' * len(part))})", part).fetchall()
                for r in rows:
                    out[r[0]] = ChunkRecord(*r[:8], json.loads(r[8]))
        return out

    def lexical_search(self, query: str, n: int) -> list[int]:
        """Keys of the n chunks that best match any word of `query` by BM25, best first."""
        words = list(dict.fromkeys(re.findall(r"\w+", query.lower())))
        if not words or n < 1:
            return []
        match = " OR ".join(f'"{w}"' for w in words)  # each word a quoted FTS5 string: no query syntax
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ? ORDER BY bm25(chunks_fts) LIMIT ?", (match, n))]


def _digest(db: sqlite3.Connection) -> str:
    h = hashlib.sha256()
    for table, query in DIGESTED:
        h.update(f"{table}\0".encode())
        for row in db.execute(query):  # one JSON list per row: types and NULLs stay distinct
            h.update(json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def _check(db: sqlite3.Connection, path: str, verify: bool) -> None:
    """Raise InputError naming `path` unless the database `db` (read from it) is whole."""
    problems = [row[0] for row in db.execute("PRAGMA quick_check(3)")]
    if problems != ["ok"]:
        found = "; ".join(_one_line(p.replace("*** in database main ***", "")) for p in problems)
        raise InputError(f"{path}: the metadata store is damaged (SQLite finds: {found}); {REBUILD}")
    manifest = {}
    for name, value in db.execute("SELECT name, value FROM manifest"):
        try:
            manifest[name] = json.loads(value)
        except (TypeError, ValueError) as e:
            raise InputError(f"{path}: manifest entry {name!r} is not valid JSON ({_one_line(e)}); the file is "
                             f"damaged or was edited, {REBUILD}") from None
    if not verify:
        return
    if DIGEST_KEY in manifest and (digest := _digest(db)) != manifest[DIGEST_KEY]:
        raise InputError(f"{path}: its manifest, documents or chunks differ from the checksum recorded when it "
                         f"was saved (sha256 {digest[:16]}..., recorded {str(manifest[DIGEST_KEY])[:16]}...): "
                         f"the file was edited or is damaged; {REBUILD}")
    try:  # rank 1: also compare the index with the chunks table it was built from
        db.execute("INSERT INTO chunks_fts (chunks_fts, rank) VALUES ('integrity-check', 1)")
    except sqlite3.DatabaseError as e:
        raise InputError(f"{path}: the keyword index (chunks_fts) does not match the chunks ({_one_line(e)}); "
                         f"the file is damaged or was edited, {REBUILD}") from None


def _one_line(error: object, limit: int = 200) -> str:
    """`error` as one line of at most `limit` characters (SQLite quotes whole damaged values)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
