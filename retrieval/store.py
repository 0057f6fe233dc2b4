"""An index directory on disk: atomic saves, and loads that check every file first.

Layout of an index directory DIR:

  DIR/meta.sqlite              the metadata store (retrieval/metadata.py): chunks, documents
                               and the manifest. Replacing this file is the commit point.
  DIR/vectors-<sha12>.usearch  the USearch index the manifest names (12 hex digits of its
                               sha256 in the name: a new save never overwrites the file the
                               current meta.sqlite points to).
  DIR/write.lock               the writer lock (retrieval/locks.py), empty; created by the
                               first save and never deleted.

Both data files are created with mode 0644 less the umask, like any file the user writes.

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
  docs_root         the directory file document ids are relative to (documents.py), or null
  next_key          the next unused vector key (keys are never reused)
  revision          random hex, new at every save: a save of an index loaded at another
                    revision than the directory now holds would lose that update, and is refused
  vectors_file      the USearch file's name in DIR
  vectors_bytes, vectors_sha256   its size and checksum, verified before it is opened
  vectors_count     vectors in it; equals the rows of the chunks table
  metadata_sha256   checksum of everything above and of the documents and chunks tables
                    (metadata.DIGEST_KEY), verified at load

Saving writes the USearch file beside the old one under its new name, fsyncs it, then
writes meta.sqlite to a temporary file, fsyncs it and renames it over meta.sqlite
(os.replace is atomic), fsyncs the directory and only then deletes files the new
meta.sqlite does not name. A crash at any point leaves either the old meta.sqlite with the
old vectors file it names, or the new pair: never a mix. Leftovers of an interrupted save
are removed by the next one.

Loading reads meta.sqlite and checks it (SQLite's quick_check, the manifest, the checksum
of its rows and the keyword index: metadata.py), then checks the vectors file's size and
sha256 against the manifest, its header (dimensions, scalar type) and that its keys are
exactly the chunk keys, before any search can touch it: a truncated, corrupted, edited or
swapped file fails with an `IndexFileError` naming it. (USearch has open reports of crafted
index files crashing a search, so nothing unverified is opened.)

One writer at a time: a save holds the directory's writer lock (locks.directory_lock), and
so does an update from load to save (Retriever.updating, which `press index add/remove`
use), so concurrent updates run one after the other and none is lost. Readers take no
lock: a load that overlaps a save's commit (it read the old meta.sqlite, whose vectors file
the save then deleted) notices meta.sqlite changed and loads again.

Format 1 (before revisions, document roots and the metadata checksum) still loads, with a
warning that its chunks are unverified; the next save writes format 2.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import warnings
from typing import Callable, Iterator

import numpy as np

from compress.errors import InputError
from retrieval.locks import LOCK_FILE, directory_lock
from retrieval.metadata import DIGEST_KEY, MetadataStore
from retrieval.vector_index import IndexSettings, VectorIndex

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: before revision, docs_root and metadata_sha256
META_FILE = "meta.sqlite"
VECTORS_PREFIX, VECTORS_SUFFIX = "vectors-", ".usearch"
TMP_PREFIX = ".tmp-"
FILE_MODE = 0o644  # less the umask
PROBE_TEXT = "press index encoder probe: the quick brown fox jumps over the lazy dog."
LOAD_ATTEMPTS = 3  # loads that overlap a save's commit are retried (see the module docstring)
REPLACE = "replace"  # save's base_revision when whatever `directory` holds is to be replaced
REQUIRED = ("format", "encoder", "encoder_probe", "dim", "dtype", "connectivity", "expansion_add", "expansion_search",
            "exact", "hybrid", "chunk_tokens", "overlap", "next_key", "vectors_file", "vectors_bytes",
            "vectors_sha256", "vectors_count")
REQUIRED_SINCE_2 = ("revision", "docs_root", DIGEST_KEY)


class IndexFileError(InputError):
    """A file of an index directory is missing, damaged or does not match its manifest."""


class IndexChangedError(InputError):
    """A save would overwrite an update another process saved since the index was loaded."""


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


def _is_index_file(name: str) -> bool:
    """Whether a save may have left `name` in an index directory (lock, temporary or vectors file)."""
    return name == LOCK_FILE or name.startswith(TMP_PREFIX) or re.fullmatch(
        rf"{VECTORS_PREFIX}[0-9a-f]{{12}}{re.escape(VECTORS_SUFFIX)}", name) is not None


def check_target(directory: str) -> None:
    """Refuse to write an index into a directory that holds anything but a press index."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise FileExistsError(f"{directory} is a file; pass a directory for the index")
    if os.path.isdir(directory) and not is_index_dir(directory) and not all(
            map(_is_index_file, os.listdir(directory))):
        raise FileExistsError(f"{directory} is not empty and holds no press index ({META_FILE}); "
                              "pass a new or empty directory")


def require_index(directory: str) -> None:
    """Raise FileNotFoundError unless `directory` holds a press index."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such index directory; build one with press index build")
    if not is_index_dir(directory):
        raise FileNotFoundError(f"{directory}: not a press index ({META_FILE} is missing); "
                                "build one with press index build")


@contextlib.contextmanager
def writer_lock(directory: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold `directory`'s writer lock (locks.directory_lock), creating the directory if needed.

    Refuses (check_target) a directory that holds anything but a press index, before creating
    the lock file in it. `on_wait` is called if another process holds the lock.
    """
    check_target(directory)
    os.makedirs(directory, exist_ok=True)
    with directory_lock(directory, on_wait):
        yield


def _new_file(directory: str, suffix: str) -> str:
    """A new empty DIRECTORY/.tmp-<random><suffix>, mode FILE_MODE less the umask (mkstemp's is 0600)."""
    while True:
        path = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(8)}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            return path
        except FileExistsError:
            continue


def _check_revision(directory: str, base_revision: str | None) -> None:
    """Raise IndexChangedError if `directory` holds an index saved at another revision than `base_revision`."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        return  # nothing there to lose
    try:
        current = MetadataStore.read_manifest_entry(meta_path, "revision")
    except InputError:
        return  # unreadable: nothing there to lose either
    if current != base_revision:
        raise IndexChangedError(
            f"{directory}: another process saved an update to this index after it was loaded (revision "
            f"{base_revision or 'none'} then, {current or 'none'} now); saving would discard that update. Load it "
            f"again (Retriever.load), repeat the change and save, or make the change inside `with "
            f"Retriever.updating({directory!r}) as retriever:`, which holds the index's writer lock from load to save")


def save(directory: str, vectors: VectorIndex, metadata: MetadataStore, manifest: dict, *,
         base_revision: str | None = REPLACE, on_wait: Callable[[], None] | None = None) -> dict:
    """Write the index atomically into `directory` (created if needed); returns the manifest written.

    Args:
      manifest: the fields above except revision, vectors_* and metadata_sha256, filled in here.
      base_revision: the revision the index was loaded at (None: a format-1 index); if
        `directory` now holds another, raise IndexChangedError instead of overwriting it.
        REPLACE (default) replaces whatever index `directory` holds.
      on_wait: called if another process holds the directory's writer lock.
    """
    with writer_lock(directory, on_wait):
        if base_revision != REPLACE:
            _check_revision(directory, base_revision)
        tmp_vectors, tmp_meta = _new_file(directory, VECTORS_SUFFIX), None
        try:
            vectors.save(tmp_vectors)
            _fsync_file(tmp_vectors)
            digest = sha256_file(tmp_vectors)
            name = f"{VECTORS_PREFIX}{digest[:12]}{VECTORS_SUFFIX}"
            final = os.path.join(directory, name)
            os.replace(tmp_vectors, final)  # if the same bytes are there, readers keep the file they opened
            _fsync_dir(directory)
            written = {**manifest, "format": FORMAT_VERSION, "revision": secrets.token_hex(8), "vectors_file": name,
                       "vectors_bytes": os.path.getsize(final), "vectors_sha256": digest,
                       "vectors_count": len(vectors)}
            metadata.set_manifest(written)
            written[DIGEST_KEY] = metadata.content_digest()
            metadata.set_manifest({DIGEST_KEY: written[DIGEST_KEY]})
            tmp_meta = _new_file(directory, ".sqlite")
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
      verify: check the vectors file's sha256 and the metadata store's checksum and keyword
        index (each reads every byte); file sizes, SQLite's quick_check and keys always.
    """
    require_index(directory)
    meta_path = os.path.join(directory, META_FILE)
    for attempt in range(1, LOAD_ATTEMPTS + 1):
        before = _identity(meta_path)
        try:
            vectors, metadata, manifest = _load(directory, view, verify)
            break
        except IndexFileError:
            if attempt == LOAD_ATTEMPTS or _identity(meta_path) == before:
                raise  # not a save committing while this load read the files
    if manifest["format"] == 1:
        warnings.warn(f"{meta_path}: saved by an older press (index format 1), which recorded no checksum of its "
                      f"chunks: they are served unverified until the next save (press index add or remove) "
                      f"writes format {FORMAT_VERSION}", stacklevel=3)  # where Retriever.load was called
    return vectors, metadata, manifest


def _identity(path: str) -> tuple | None:
    """What changes when a save replaces `path`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _load(directory: str, view: bool, verify: bool) -> tuple[VectorIndex, MetadataStore, dict]:
    meta_path = os.path.join(directory, META_FILE)
    try:
        metadata = MetadataStore.read(meta_path, verify=verify)
    except InputError as e:
        raise IndexFileError(str(e)) from None
    manifest = metadata.manifest()
    if manifest.get("format") not in READABLE_FORMATS:
        raise IndexFileError(f"{meta_path}: index format {manifest.get('format')}, this press reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))}; rebuild the index")
    required = REQUIRED + (REQUIRED_SINCE_2 if manifest["format"] >= 2 else ())
    missing = [k for k in required if k not in manifest]
    if missing:
        raise IndexFileError(f"{meta_path}: the manifest lacks {', '.join(missing)}; rebuild the index")
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
