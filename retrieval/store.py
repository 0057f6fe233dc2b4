"""An index directory on disk: atomic saves, and loads that check every file first.

Layout of an index directory DIR:

  DIR/meta.sqlite              the metadata store (retrieval/metadata.py): chunks, documents
                               and the manifest. Replacing this file is the commit point.
  DIR/vectors-<sha12>.usearch  the USearch index the manifest names (12 hex digits of its
                               sha256 in the name: a new save never overwrites the file the
                               current meta.sqlite points to).

The manifest (table `manifest` of meta.sqlite, one JSON value per name):

  format            FORMAT_VERSION
  encoder           the sentence encoder's name (bundled name or directory)
  encoder_probe     the encoder's embedding of PROBE_TEXT: a loaded index refuses an
                    encoder whose embedding of it differs (another model, same name or not)
  dim               embedding length D
  dtype, connectivity, expansion_add, expansion_search   USearch settings (vector_index.py)
  metric            "cos"
  exact             whether searches default to exact (brute-force) search
  hybrid            whether searches default to fusing keyword (BM25) matches in
  chunk_tokens, overlap   how documents were chunked (chunking.py); updates cut the same way
  next_key          the next unused vector key (keys are never reused)
  vectors_file      the USearch file's name in DIR
  vectors_bytes, vectors_sha256   its size and checksum, verified before it is opened
  vectors_count     vectors in it; equals the rows of the chunks table

Saving writes the USearch file beside the old one under its new name, fsyncs it, then
writes meta.sqlite to a temporary file, fsyncs it and renames it over meta.sqlite
(os.replace is atomic), fsyncs the directory and only then deletes files the new
meta.sqlite does not name. A crash at any point leaves either the old meta.sqlite with the
old vectors file it names, or the new pair: never a mix. Leftovers of an interrupted save
are removed by the next one.

Loading reads meta.sqlite, then checks the vectors file's size and sha256 against the
manifest, its header (dimensions, scalar type) and that its keys are exactly the chunk
keys, before any search can touch it: a truncated, corrupted or swapped file fails with
an `IndexFileError` naming it. (USearch has open reports of crafted index files crashing
a search, so nothing unverified is opened.)

One writer at a time: two processes updating one directory at once lose one's update.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

from retrieval.metadata import MetadataStore
from retrieval.vector_index import IndexSettings, VectorIndex

FORMAT_VERSION = 1
META_FILE = "meta.sqlite"
VECTORS_PREFIX, VECTORS_SUFFIX = "vectors-", ".usearch"
TMP_PREFIX = ".tmp-"
PROBE_TEXT = "press index encoder probe: the quick brown fox jumps over the lazy dog."


class IndexFileError(ValueError):
    """A file of an index directory is missing, damaged or does not match its manifest."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems cannot fsync a directory; the renames are still atomic
        pass


def is_index_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, META_FILE))


def check_target(directory: str) -> None:
    """Refuse to write an index into a directory that holds anything but a press index."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file; pass a directory for the index")
    if os.path.isdir(directory) and os.listdir(directory) and not is_index_dir(directory):
        raise FileExistsError(f"{directory} is not empty and holds no press index ({META_FILE}); "
                              "pass a new or empty directory")


def save(directory: str, vectors: VectorIndex, metadata: MetadataStore, manifest: dict) -> dict:
    """Write the index atomically into `directory` (created if needed); returns the manifest written.

    `manifest` holds the fields above except the vectors_* ones, which are filled in here.
    """
    check_target(directory)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_vectors = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=VECTORS_SUFFIX, dir=directory)
    os.close(fd)
    tmp_meta = None
    try:
        vectors.save(tmp_vectors)
        _fsync_file(tmp_vectors)
        digest = sha256_file(tmp_vectors)
        name = f"{VECTORS_PREFIX}{digest[:12]}{VECTORS_SUFFIX}"
        final = os.path.join(directory, name)
        if os.path.exists(final) and os.path.getsize(final) == os.path.getsize(tmp_vectors) and sha256_file(final) == digest:
            os.unlink(tmp_vectors)  # the same bytes are already there (nothing changed)
        else:
            os.replace(tmp_vectors, final)
        _fsync_dir(directory)
        written = {**manifest, "format": FORMAT_VERSION, "vectors_file": name,
                   "vectors_bytes": os.path.getsize(final), "vectors_sha256": digest, "vectors_count": len(vectors)}
        metadata.set_manifest(written)
        fd, tmp_meta = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".sqlite", dir=directory)
        os.close(fd)
        os.unlink(tmp_meta)  # SQLite writes a fresh file
        metadata.write(tmp_meta)
        _fsync_file(tmp_meta)
        os.replace(tmp_meta, os.path.join(directory, META_FILE))  # the commit point
        tmp_meta = None
        _fsync_dir(directory)
    finally:
        for leftover in (tmp_vectors, tmp_meta):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
    for entry in os.listdir(directory):  # what the committed meta.sqlite does not name
        stale_vectors = entry.startswith(VECTORS_PREFIX) and entry.endswith(VECTORS_SUFFIX) and entry != name
        if stale_vectors or entry.startswith(TMP_PREFIX):
            os.unlink(os.path.join(directory, entry))
    return written


def settings_of(manifest: dict) -> IndexSettings:
    return IndexSettings(dtype=manifest["dtype"], connectivity=manifest["connectivity"],
                         expansion_add=manifest["expansion_add"], expansion_search=manifest["expansion_search"])


def load(directory: str, *, view: bool = False, verify: bool = True) -> tuple[VectorIndex, MetadataStore, dict]:
    """Open the index in `directory`: (vectors, metadata, manifest), every file checked first.

    Args:
      view: memory-map the vectors file instead of reading it (read-only; for large indexes).
      verify: check the vectors file's sha256 (reads it once); its size is always checked.
    """
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such index directory; build one with press index build")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory}: not a press index ({META_FILE} is missing); "
                                "build one with press index build")
    try:
        metadata = MetadataStore.read(meta_path)
    except ValueError as e:
        raise IndexFileError(str(e)) from None
    manifest = metadata.manifest()
    required = ("format", "encoder", "encoder_probe", "dim", "dtype", "connectivity", "expansion_add",
                "expansion_search", "exact", "hybrid", "chunk_tokens", "overlap", "next_key", "vectors_file",
                "vectors_bytes", "vectors_sha256", "vectors_count")
    missing = [k for k in required if k not in manifest]
    if missing:
        raise IndexFileError(f"{meta_path}: the manifest lacks {', '.join(missing)}; rebuild the index")
    if manifest["format"] != FORMAT_VERSION:
        raise IndexFileError(f"{meta_path}: index format {manifest['format']}, this press reads format "
                             f"{FORMAT_VERSION}; rebuild the index")
    path = os.path.join(directory, manifest["vectors_file"])
    _verify_vectors_file(path, manifest, verify)
    try:
        vectors = VectorIndex.restore(path, manifest["dim"], settings_of(manifest), view=view)
    except (RuntimeError, ValueError) as e:
        raise IndexFileError(f"{path}: USearch cannot open it ({e}); rebuild the index") from None
    keys = vectors.keys()
    stored = np.asarray(metadata.keys(), dtype=np.uint64)
    if len(keys) != len(stored) or not np.array_equal(keys, stored):
        raise IndexFileError(f"{path}: holds {len(keys)} vectors but {meta_path} lists {len(stored)} chunks "
                             "under other keys; the two do not belong together, rebuild the index")
    return vectors, metadata, manifest


def _verify_vectors_file(path: str, manifest: dict, verify: bool) -> None:
    from usearch.index import Index

    if not os.path.isfile(path):
        raise IndexFileError(f"{path}: the vectors file named in the manifest is missing; rebuild the index")
    size = os.path.getsize(path)
    if size != manifest["vectors_bytes"]:
        raise IndexFileError(f"{path}: {size} bytes, the manifest records {manifest['vectors_bytes']}: "
                             "the file is truncated or was replaced; rebuild the index")
    if verify and (digest := sha256_file(path)) != manifest["vectors_sha256"]:
        raise IndexFileError(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                             f"{manifest['vectors_sha256'][:16]}...: the file is corrupted; rebuild the index")
    header = Index.metadata(path)
    if header is None:
        raise IndexFileError(f"{path}: not a USearch index file; rebuild the index")
    if header["dimensions"] != manifest["dim"]:
        raise IndexFileError(f"{path}: holds {header['dimensions']}-dimensional vectors, the manifest says "
                             f"{manifest['dim']}; rebuild the index")
    kind = str(header["kind_scalar"]).rsplit(".", 1)[-1].split(":")[0].lower()
    if kind != manifest["dtype"]:
        raise IndexFileError(f"{path}: stores {kind} vectors, the manifest says {manifest['dtype']}; rebuild the index")
