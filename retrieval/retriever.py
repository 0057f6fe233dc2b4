"""The retriever: documents in, chunks embedded into a vector index, ranked chunks out.

  retriever = Retriever(SentenceEncoder.from_pretrained("all-minilm-l6-v2"))
  retriever.add(read_documents(["docs/"]))
  for hit in retriever.search("How do I install it?", k=5):
      print(f"{hit.score:.2f} {hit.source} {hit.heading} [{hit.start}:{hit.end}]")
  retriever.save("out/index")
  retriever = Retriever.load("out/index")      # the encoder named in the index, checked
  with Retriever.updating("out/index") as retriever:   # load, change, save: one writer at a time
      retriever.add(read_documents(["docs/"], root=retriever.docs_root))

Updates are by document id. `add` replaces a document that is already indexed (all its
old chunks go), skips one whose content is unchanged, and is all-or-nothing: if anything
fails (encoding, the vector index, the metadata store), what was indexed before is left
exactly as it was. `remove` takes document ids and drops all their chunks.

Ranking (hybrid by default): the vector index's nearest chunks and the metadata store's
BM25 keyword matches (SQLite FTS5) are fused by reciprocal rank: a chunk scores
1 / (RRF_K + its rank among the nearest) + 1 / (RRF_K + its rank among the keyword matches),
over the best CANDIDATES of each list. Embeddings catch paraphrases; keywords catch the
rare exact words embeddings blur (`setdefault`, `__getattr__`, `nonlocal`). RRF_K = 60 is
the constant of Cormack, Clarke and Buettcher (2009), not tuned here. `hybrid=False` ranks by
cosine similarity alone. Either way `Hit.score` is the chunk's cosine similarity to the query
(what relevance thresholds compare against), so hybrid hits are not always sorted by it.

Thread safety: searches from any number of threads run together; an update waits for
them and blocks new ones while it runs (retrieval/locks.py). Encoding happens outside
the lock, so searches continue while a large `add` embeds its chunks.

Processes: several may search one index directory while another updates it. Updates from
several processes must not each load, change and save, or the last save discards the
others' changes: `Retriever.updating(directory)` holds the directory's writer lock from
load to save, so they run one after the other (`press index add/remove` use it). A plain
`save` over the directory an index was loaded from refuses (IndexChangedError) if another
process saved it since, rather than discard that update; load again and repeat the change.
(Merging instead would need the change replayed onto the newer index, and a conflict on
one document id would be decided silently.) Saving to any other directory replaces its index.

`docs_root` is the directory the ids of file documents are relative to (documents.py),
recorded the first time files are added (from Document.root) and saved with the index;
`add` refuses documents whose ids are relative to another directory, which would give one
file two ids. Read files for an index with `read_documents(paths, root=retriever.docs_root)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from compress.errors import InputError, check_unicode
from retrieval import store
from retrieval.chunking import Chunk, ChunkingConfig, chunk_document
from retrieval.documents import Document
from retrieval.encoder import SentenceEncoder
from retrieval.locks import ReadWriteLock
from retrieval.metadata import MetadataStore
from retrieval.vector_index import IndexSettings, VectorIndex

RRF_K = 60  # reciprocal rank fusion constant
CANDIDATES = 50  # hits taken from each ranking before fusing (at least k)
ENCODER_PROBE_MIN_COSINE = 0.99  # below this, an encoder is not the one an index was built with
Progress = Callable[[int, int], None]  # (chunks embedded so far, chunks to embed)


class EncoderMismatchError(InputError):
    """The encoder differs from the one an index was built with."""


@dataclasses.dataclass(frozen=True)
class Hit:
    """One search result: a chunk and its cosine similarity to the query (`score`)."""

    score: float
    text: str
    doc_id: str
    source: str
    heading: str | None
    start: int  # character offsets of `text` in the document
    end: int
    ordinal: int  # the chunk's position in its document
    key: int  # its vector key
    metadata: dict[str, Any]

    def location(self) -> str:
        """'source > heading, chars start-end' for citations."""
        where = self.source + (f" > {self.heading}" if self.heading else "")
        line = f", line {self.metadata['line']}" if "line" in self.metadata else ""
        return f"{where}{line}, chars {self.start}-{self.end}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class AddReport:
    """What one `add` did, by document id."""

    added: tuple[str, ...]  # new documents
    replaced: tuple[str, ...]  # documents whose content changed: old chunks removed
    unchanged: tuple[str, ...]  # same content as indexed: nothing done
    chunks: int  # chunks embedded and inserted


class Retriever:
    """Chunks, embeds, indexes and searches documents. See the module docstring.

    Args:
      encoder: the sentence encoder (its name and embedding are recorded in saved indexes).
      settings: USearch storage and HNSW settings.
      chunking: chunk size and overlap in encoder tokens.
      exact: search by brute force (NumPy) unless a search asks otherwise; for small corpora.
      hybrid: fuse keyword (BM25) matches into the ranking unless a search asks otherwise.
      docs_root: the directory file document ids are relative to (documents.document_root);
        default: that of the first documents added that have one (Document.root).
    """

    def __init__(self, encoder: SentenceEncoder, *, settings: IndexSettings = IndexSettings(),
                 chunking: ChunkingConfig = ChunkingConfig(), exact: bool = False, hybrid: bool = True,
                 docs_root: str | None = None, _vectors: VectorIndex | None = None,
                 _metadata: MetadataStore | None = None, _next_key: int = 0):
        self.max_tokens = encoder.max_length - 2  # [CLS] and [SEP]
        chunking.validate(self.max_tokens)
        settings.validate()
        self.encoder, self.settings, self.chunking = encoder, settings, chunking
        self.exact, self.hybrid = exact, hybrid
        self._vectors = _vectors or VectorIndex(encoder.dim, settings)
        self._metadata = _metadata or MetadataStore()
        self._next_key = _next_key
        self._lock = ReadWriteLock()
        self._probe: list[float] | None = None
        self._docs_root = None if docs_root is None else os.path.realpath(docs_root)
        self.index_format: int | None = None  # the format of the index this was loaded from
        self._origin: tuple[str, str | None] | None = None  # (directory, revision) last loaded or saved
        self._unsaved = False  # changed since loaded or saved

    # --- persistence

    @classmethod
    def load(cls, directory: str, *, encoder: SentenceEncoder | None = None, view: bool = False,
             verify: bool = True, exact: bool | None = None, hybrid: bool | None = None) -> Retriever:
        """Open a saved index (see retrieval/store.py for the checks made).

        Args:
          encoder: the encoder to query with; default: load the one named in the index.
            Either way it must embed like the one the index was built with.
          view: memory-map the vectors (read-only: add/remove raise).
          verify: check the vectors file's sha256 before opening it.
          exact, hybrid: override the index's default search modes.
        """
        vectors, metadata, manifest = store.load(directory, view=view, verify=verify)
        if encoder is None:
            encoder = SentenceEncoder.from_pretrained(manifest["encoder"],
                                                      quantization=manifest.get("encoder_quantization"))
        meta_path = f"{directory}/{store.META_FILE}"
        if encoder.dim != manifest["dim"]:
            raise EncoderMismatchError(
                f"{meta_path}: the index holds {manifest['dim']}-dimensional vectors of encoder "
                f"{manifest['encoder']!r}; encoder {encoder.name!r} makes {encoder.dim}-dimensional ones. "
                f"Query it with {manifest['encoder']!r} or rebuild the index")
        retriever = cls(encoder, settings=store.settings_of(manifest),
                        chunking=ChunkingConfig(manifest["chunk_tokens"], manifest["overlap"]),
                        exact=manifest["exact"] if exact is None else exact,
                        hybrid=manifest["hybrid"] if hybrid is None else hybrid,
                        docs_root=manifest.get("docs_root"),
                        _vectors=vectors, _metadata=metadata, _next_key=manifest["next_key"])
        retriever.index_format = manifest["format"]
        retriever._origin = (os.path.realpath(directory), manifest.get("revision"))
        probe = np.asarray(manifest["encoder_probe"], np.float32)
        cosine = float(retriever.probe() @ probe / max(np.linalg.norm(probe), 1e-12))
        if cosine < ENCODER_PROBE_MIN_COSINE:
            raise EncoderMismatchError(
                f"{meta_path}: built with encoder {manifest['encoder']!r}, but encoder {encoder.name!r} embeds "
                f"differently (cosine {cosine:.3f} on a probe text); query it with {manifest['encoder']!r} "
                "or rebuild the index")
        return retriever

    def probe(self) -> np.ndarray:
        """The encoder's embedding of store.PROBE_TEXT: float32 [D]."""
        if self._probe is None:
            self._probe = self.encoder.encode([store.PROBE_TEXT])[0].tolist()
        return np.asarray(self._probe, np.float32)

    def manifest(self) -> dict:
        """The manifest fields a save records (store.py), except the vectors file's."""
        return {
            "encoder": self.encoder.name, "encoder_quantization": self.encoder.quantization,
            "encoder_probe": self.probe().tolist(), "dim": self.encoder.dim,
            "metric": "cos", **dataclasses.asdict(self.settings), "exact": self.exact, "hybrid": self.hybrid,
            **dataclasses.asdict(self.chunking), "docs_root": self._docs_root, "next_key": self._next_key,
        }

    @classmethod
    @contextlib.contextmanager
    def updating(cls, directory: str, *, on_wait: Callable[[], None] | None = None,
                 **load_options: Any) -> Iterator[Retriever]:
        """Load the index in `directory`, let the block change it, then save it, all under the
        directory's writer lock: concurrent updates from other processes wait, none is lost.

          with Retriever.updating("out/index") as retriever:
              retriever.remove(["notes/old.md"])

        Saved only if the block changed something and did not raise.

        Args:
          on_wait: called if another process holds the lock (before waiting for it).
          load_options: passed to `load` (encoder, verify, ...).
        """
        store.require_index(directory)  # before the lock file is created in it
        with store.writer_lock(directory, on_wait):
            retriever = cls.load(directory, **load_options)
            yield retriever
            if retriever._unsaved:
                retriever.save(directory)

    def save(self, directory: str, *, on_wait: Callable[[], None] | None = None) -> dict:
        """Write the index atomically to `directory`; returns the manifest written.

        Over the directory this was loaded from (or last saved to), raises IndexChangedError
        if another process saved it since; any other directory's index is replaced.
        on_wait: called if another process holds the directory's writer lock.
        """
        self.probe()  # encode outside the locks
        target = os.path.realpath(directory)
        base = self._origin[1] if self._origin is not None and self._origin[0] == target else store.REPLACE
        with store.writer_lock(directory, on_wait), self._lock.write():  # nothing changes while the files are written
            written = store.save(directory, self._vectors, self._metadata, self.manifest(), base_revision=base)
            self._origin, self._unsaved = (target, written["revision"]), False
        return written

    @property
    def docs_root(self) -> str | None:
        """The directory file document ids are relative to (see the module docstring)."""
        return self._docs_root

    @docs_root.setter
    def docs_root(self, directory: str | None) -> None:
        directory = None if directory is None else os.path.realpath(directory)
        if directory != self._docs_root:
            self._docs_root, self._unsaved = directory, True

    # --- what is indexed

    def __len__(self) -> int:
        """Chunks indexed."""
        return len(self._vectors)

    def documents(self) -> dict[str, Any]:
        """{doc_id: DocumentRecord(source, title, fingerprint, chunks)} of every indexed document."""
        with self._lock.read():
            return self._metadata.documents()

    @property
    def read_only(self) -> bool:
        return self._vectors.read_only

    # --- updates

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings of `texts` with this retriever's encoder: float32 [n, D]."""
        return self.encoder.encode(list(texts))

    def chunk(self, doc: Document) -> list[Chunk]:
        """The chunks `add` would index for `doc`."""
        return chunk_document(doc, self.encoder.token_spans, self.chunking, self.max_tokens)

    def add(self, documents: Iterable[Document], *, progress: Progress | None = None) -> AddReport:
        """Index documents, replacing indexed ones with the same id; all or nothing.

        Args:
          documents: Document objects (retrieval/documents.py); ids unique among them.
          progress: called as progress(embedded, total) while chunks are embedded.
        """
        if self.read_only:
            raise PermissionError("this index was loaded with view=True (memory-mapped, read-only); "
                                  "load it without view to add documents")
        documents = list(documents)
        seen: dict[str, str] = {}
        for doc in documents:
            if doc.doc_id in seen:
                raise InputError(f"document id {doc.doc_id!r} comes twice ({seen[doc.doc_id]} and {doc.source})")
            seen[doc.doc_id] = doc.source
        root = self._root_of(documents)
        indexed = self.documents()
        todo = [d for d in documents if d.doc_id not in indexed or indexed[d.doc_id].fingerprint != d.fingerprint()]
        todo_ids = {d.doc_id for d in todo}
        unchanged = tuple(d.doc_id for d in documents if d.doc_id not in todo_ids)
        chunks = [self.chunk(d) for d in todo]
        flat = [c for cs in chunks for c in cs]
        vectors = self._embed([c.embed_text for c in flat], progress)  # [n, D], outside the lock
        with self._lock.write():
            keys = np.arange(self._next_key, self._next_key + len(flat), dtype=np.uint64)
            old = np.asarray(self._metadata.keys(todo_ids), dtype=np.uint64)
            old_vectors = self._vectors.get(old)  # [m, D], to put back if the add fails after removing them
            try:
                with self._metadata.transaction():
                    at = 0
                    for doc, cs in zip(todo, chunks):
                        self._metadata.put_document(doc.doc_id, doc.source, doc.title, doc.fingerprint(), cs,
                                                    [int(k) for k in keys[at : at + len(cs)]])
                        at += len(cs)
                    self._vectors.add(keys, vectors)
                    self._vectors.remove(old)
            except BaseException:
                # The metadata rolled back by itself; put the vector index back as it was.
                self._vectors.remove(keys[self._vectors.contains(keys)])
                lost = ~self._vectors.contains(old)
                self._vectors.add(old[lost], old_vectors[lost])
                raise
            self._next_key += len(flat)
            self._unsaved = self._unsaved or bool(todo)
            if root is not None:
                self.docs_root = root
        return AddReport(added=tuple(d.doc_id for d in todo if d.doc_id not in indexed),
                         replaced=tuple(d.doc_id for d in todo if d.doc_id in indexed),
                         unchanged=unchanged, chunks=len(flat))

    def _root_of(self, documents: list[Document]) -> str | None:
        """The directory the documents' path ids are relative to; InputError if it is not this index's."""
        roots: dict[str, Document] = {}
        for doc in documents:
            if doc.root is not None:
                roots.setdefault(os.path.realpath(doc.root), doc)
        expected = self._docs_root or next(iter(roots), None)
        for root, doc in roots.items():
            if root != expected:
                whose = "this index's" if self._docs_root else "other"
                raise InputError(f"document {doc.doc_id!r} has an id relative to {root}, but {whose} file ids are "
                                 f"relative to {expected}: one file would get two ids. Read the documents with "
                                 "read_documents(paths, root=retriever.docs_root)")
        return expected if roots else None

    def _embed(self, texts: list[str], progress: Progress | None) -> np.ndarray:
        out = np.zeros((len(texts), self.encoder.dim), np.float32)
        step = self.encoder.batch_size * 4
        if progress is not None:
            progress(0, len(texts))
        for start in range(0, len(texts), step):
            out[start : start + step] = self.encoder.encode(texts[start : start + step])
            if progress is not None:
                progress(min(start + step, len(texts)), len(texts))
        return out

    def remove(self, doc_ids: Iterable[str]) -> int:
        """Drop documents and all their chunks; returns the chunks removed.

        Unknown ids raise KeyError naming them, and then nothing is removed.
        """
        if self.read_only:
            raise PermissionError("this index was loaded with view=True (memory-mapped, read-only); "
                                  "load it without view to remove documents")
        doc_ids = list(dict.fromkeys(doc_ids))
        with self._lock.write():
            indexed = self._metadata.documents()
            unknown = [d for d in doc_ids if d not in indexed]
            if unknown:
                raise KeyError(f"no document with id {', '.join(map(repr, unknown))} in the index; "
                               "`press index search --json` shows the doc_id of each hit")
            keys = np.asarray(self._metadata.keys(doc_ids), dtype=np.uint64)
            with self._metadata.transaction():
                self._metadata.delete_documents(doc_ids)
                self._vectors.remove(keys)
            self._unsaved = self._unsaved or bool(doc_ids)
            return len(keys)

    # --- search

    def search(self, query: str, k: int = 5, *, exact: bool | None = None, hybrid: bool | None = None) -> list[Hit]:
        """The k best chunks for `query` (fewer if fewer are indexed); see the module docstring.

        exact, hybrid: this search's modes (default: the retriever's).
        """
        if not isinstance(query, str):
            raise TypeError("search takes one query string; use search_many for a list")
        return self.search_many([query], k, exact=exact, hybrid=hybrid)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, *, exact: bool | None = None,
                    hybrid: bool | None = None) -> list[list[Hit]]:
        """`search` for several queries at once (one encoder batch)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k={k!r}; it must be a positive integer")
        queries = list(queries)
        for i, query in enumerate(queries):
            if isinstance(query, str):
                check_unicode(query, f"query {i}" if len(queries) > 1 else "the query")
        vectors = self.encode(queries)  # [q, D], outside the lock
        exact = self.exact if exact is None else exact
        hybrid = self.hybrid if hybrid is None else hybrid
        n = max(k, CANDIDATES) if hybrid else k
        with self._lock.read():
            keys, scores = self._vectors.search(vectors, n, exact=exact)  # [q, n] each
            ranked = []  # per query: [(key, cosine)] best first
            for query, vector, row_keys, row_scores in zip(queries, vectors, keys, scores):
                dense = [(int(key), float(s)) for key, s in zip(row_keys, row_scores) if np.isfinite(s)]
                if hybrid:
                    dense = self._fuse(dense, self._metadata.lexical_search(query, n), vector)
                ranked.append(dense[:k])
            records = self._metadata.chunks({key for row in ranked for key, _ in row})
        return [[Hit(score, r.text, r.doc_id, r.source, r.heading, r.start, r.end, r.ordinal, r.key, r.metadata)
                 for key, score in row if (r := records.get(key)) is not None] for row in ranked]

    def _fuse(self, dense: list[tuple[int, float]], lexical: list[int], query: np.ndarray) -> list[tuple[int, float]]:
        """Reciprocal rank fusion of the nearest chunks [(key, cosine)] and the keyword matches [key]."""
        fused: dict[int, float] = {}
        for ranking in ([key for key, _ in dense], lexical):
            for rank, key in enumerate(ranking, start=1):
                fused[key] = fused.get(key, 0.0) + 1.0 / (RRF_K + rank)
        cosine = dict(dense)
        missing = np.asarray([key for key in lexical if key not in cosine], dtype=np.uint64)
        if len(missing):  # keyword matches the vector search did not return: score them exactly
            stored = self._vectors.get(missing)  # [m, D]
            stored /= np.maximum(np.linalg.norm(stored, axis=1, keepdims=True), 1e-12)
            cosine.update(zip(missing.tolist(), (stored @ query).tolist()))
        order = sorted(fused, key=lambda key: (-fused[key], -cosine[key]))
        return [(key, cosine[key]) for key in order]
