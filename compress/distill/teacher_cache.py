"""An offline teacher: its top-k log-probabilities over the training rows, computed once, read for
any number of distillation epochs.

    summary = write_cache(teacher.config, teacher.params, teacher.tokenizer, data, "out/teacher-cache",
                          k=64, teacher_name="smollm2-135m-instruct")      # resumable after kill -9
    cache = open_cache("out/teacher-cache")             # a complete cache, or InputError saying what to do
    check_for_training(cache, teacher_name="smollm2-135m-instruct", teacher_config=config, tokenizer=tokenizer,
                       seq_len=512, k=32)              # InputError naming what differs
    batches = cache_batches("out/teacher-cache", batch_size=8, seed=0, epochs=None)
    batch = next(batches)       # the train batch keys, plus teacher_ids and teacher_log_probs [B, T, k]
    state = batches.get_state() # JSON-serialisable; set_state(state) on a fresh iterator continues exactly

The cache is a dataset of packed rows: one pass of `train_batches(data, tokenizer)` (data.epochs
passes over the documents, 1 for each once), in the pipeline's order, each row stored with the
teacher's outputs for it. A cache directory holds:

  manifest.json       what the cache holds and how far the writer got (below)
  write.lock          held by the one writer at a time (compress/file_locks.py; never deleted)
  inputs/, targets/, segment_ids/, positions/     zarr3 int32 [N, T]: the pipeline's rows
  loss_mask/          zarr3 float32 [N, T]
  teacher_ids/        zarr3 int32 [N, T, k]: the teacher's k most likely next tokens, most likely first
  teacher_log_probs/  zarr3 float16 [N, T, k]: their log-probabilities over the whole vocabulary at
                      temperature 1 (what `losses.top_k` returns; a loss softens them itself)

Why float16 for the log-probabilities: they halve the bytes of float32, and log-probabilities lie
in [-~50, 0], a range where float16 (10 mantissa bits) is 8x finer than bfloat16 (7 bits), whose
wider exponent range log-probabilities never use: the error of a log-probability is at most
2^-11 of its size, 0.002 at log p = -4 (a probability off by 0.2%, where bfloat16 is off by up to
1.6%), far below what distillation can notice. Losses cast them to float32 (losses.py does).

Why float32 for the loss mask, not uint8: rows read back equal the pipeline's, and zstd stores a
column of 1.0s in almost nothing.

Chunks: every array is cut along rows into shards of `batch_size` rows (what one teacher forward
writes, whole), each shard holding one chunk per row (zarr3's sharding codec, zstd inside): the
writer writes whole files, and a shuffled reader decodes only the rows it asks for.

The number of rows N is counted before anything is written (a pass of the pipeline: tokenization
only), so the arrays keep one shape from creation on and a resumed writer never resizes them.

Manifest (written atomically: a temporary file, fsync, os.replace): format version; the teacher
(name, its DecoderConfig, a fingerprint of its weights); the tokenizer's fingerprint; the data
config (compress.config.to_dict) and a fingerprint of the documents read; k; seq_len; rows (N);
rows_done and tokens_done (committed so far); complete. Rows are committed in order: a batch's
arrays are written, the writes waited for, then rows_done moves past them. A writer killed with
-9 loses only uncommitted rows: rerun, it skips the first rows_done rows of the (deterministic)
pipeline and continues. A rerun with another teacher, tokenizer, data or k is refused, naming
what differs; a rerun of a complete cache does nothing and says so.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator, Sequence

import grain
import jax
import numpy as np
import tensorstore as ts

from compress import config as cfg
from compress import file_locks
from compress.data.pipeline import BATCH_KEYS, DataConfig, train_batches
from compress.data.sources import ChatDocument, TextDocument, read_sources
from compress.distill.losses import top_k
from compress.errors import InputError
from compress.formats.registry import resolve
from compress.models import decoder

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK = "write.lock"  # held by the writer (compress/file_locks.py), never deleted
TEACHER_KEYS = ("teacher_ids", "teacher_log_probs")
# Every array of a cache: (dtype, rank); ranks 2 are [N, T], ranks 3 [N, T, k].
ARRAYS = {
    "inputs": ("int32", 2),
    "targets": ("int32", 2),
    "segment_ids": ("int32", 2),
    "positions": ("int32", 2),
    "loss_mask": ("float32", 2),
    "teacher_ids": ("int32", 3),
    "teacher_log_probs": ("float16", 3),
}
# DataConfig fields that do not change the rows (left out when two data configs are compared).
_DATA_KEYS_IGNORED = ("prefetch",)
# Encoded into the tokenizer's fingerprint: catches tokenizers with the same vocabulary whose
# merges or normalisation differ.
_PROBE_TEXT = "The quick brown fox jumps over the lazy dog; def f(x): return x ** 2  # 3.14 ünïcödé 日本"


# ----------------------------------------------------------------------------- fingerprints


def teacher_fingerprint(params: Any, samples_per_leaf: int = 1 << 16) -> str:
    """sha256 of the parameter tree's structure, shapes and dtypes, and of `samples_per_leaf`
    evenly spaced elements of every leaf: what tells one teacher's weights from another's (a
    fine-tune changes whole matrices) without copying every byte to the host."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf)
        stride = max(1, -(-leaf.size // samples_per_leaf))
        sample = np.asarray(jax.device_get(leaf.reshape(-1)[::stride]))
        digest.update(f"{jax.tree_util.keystr(path)}:{leaf.shape}:{leaf.dtype}:".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's sorted vocabulary, special tokens, chat template and the ids of a
    probe text: tokenizers with equal fingerprints encode alike, as far as those can tell."""
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", [])),
        "bos": getattr(tokenizer, "bos_token_id", None),
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "probe": list(tokenizer.encode(_PROBE_TEXT)),
    }
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def documents_fingerprint(documents: Sequence[Any]) -> str:
    """sha256 of the documents' contents in order (a standard-library module by its name and file:
    its text is read lazily and the standard library does not change under an installed Python)."""
    digest = hashlib.sha256()
    for document in documents:
        if isinstance(document, ChatDocument):
            part = json.dumps(document.messages, sort_keys=True, ensure_ascii=False)
        elif isinstance(document, TextDocument):
            part = document.text
        else:
            part = repr(document)
        data = part.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- writing


@dataclasses.dataclass
class CacheSummary:
    """What `write_cache` did (printed as JSON by `press teacher-cache`)."""

    directory: str
    rows: int  # N, packed rows of seq_len tokens
    tokens: int  # positions of those rows that hold a token (not padding)
    seq_len: int
    k: int
    resumed_from: int  # rows already committed when this call started (0: a new cache)
    rows_written: int  # rows this call computed and committed
    already_complete: bool  # the cache was complete: nothing was done
    seconds: float


def write_cache(
    teacher_config: decoder.DecoderConfig,
    teacher_params: Any,
    tokenizer: Any,
    data: DataConfig,
    directory: str,
    *,
    k: int,
    teacher_name: str,
    batch_size: int = 8,
    log: Callable[[str], None] | None = None,
) -> CacheSummary:
    """Write (or continue, or confirm) the teacher cache of `data` in `directory`.

    Args:
      teacher_config, teacher_params: the teacher (float or quantized parameters, on device).
      tokenizer: the teacher's tokenizer; it encodes the documents.
      data: the rows: one pass of train_batches(data, tokenizer), `data.epochs` passes over the
        documents (it must be finite), every token of them once; the padding rows that complete
        the pass's last batch are not cached (data.batch_size changes nothing else).
      directory: the cache; created if absent. One holding a cache of the same teacher, tokenizer,
        data and k is continued (or, complete, left as it is); any other is refused.
      k: how many of the teacher's most likely tokens to keep per position.
      teacher_name: how the teacher was named (a bundled name or a path), for the manifest.
      batch_size: rows per teacher forward, and per shard of the arrays.
      log: called with progress lines.
    Returns:
      A CacheSummary.
    Raises:
      InputError: a bad k, infinite epochs, data without rows, or a directory that holds another
        cache (naming the field that differs) or something else.
    """
    log = log or (lambda line: None)
    started = time.perf_counter()
    if not 1 <= k <= teacher_config.vocab_size:
        raise InputError(f"k={k}: keep between 1 and the teacher's vocabulary of {teacher_config.vocab_size} tokens")
    if batch_size < 1:
        raise InputError(f"batch_size={batch_size}: a teacher forward needs at least 1 row")
    if data.epochs is None:
        raise InputError("data.epochs is None (forever); a cache holds a finite pass, set data.epochs (1: every "
                         "document once) and read the cache for as many epochs as you like")
    documents = read_sources(data.sources)
    identity = {
        "format": FORMAT_VERSION,
        "teacher": {"name": teacher_name, "config": _plain(dataclasses.asdict(teacher_config)),
                    "fingerprint": teacher_fingerprint(teacher_params)},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": cfg.to_dict(data),
        "documents": documents_fingerprint(documents),
        "k": k,
        "seq_len": data.seq_len,
    }
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"{directory} is a file; give a new or empty directory for the teacher cache")
    os.makedirs(directory, exist_ok=True)
    # One writer: two at once would each count, create and commit the arrays (another data config's
    # shapes over the first's) and move rows_done under each other.
    with file_locks.exclusive(os.path.join(directory, LOCK), refuse=InputError(
            f"{directory} is being written by another press teacher-cache; wait for it to end (rerunning then "
            "continues or confirms its cache), or give another directory")):
        manifest = _read_manifest(directory)
        if manifest is not None:
            _refuse_another_cache(manifest, identity, directory)
            if manifest["complete"]:
                log(f"{directory} already holds this complete cache ({manifest['rows']} rows); nothing to do")
                return _summary(directory, manifest, resumed_from=manifest["rows"], written=0, done=True, started=started)
            log(f"resuming {directory} at row {manifest['rows_done']} of {manifest['rows']}")
        else:
            _require_new(directory)
            count = _count_rows(data, tokenizer, documents)
            if count == 0:
                raise InputError(f"{', '.join(data.sources)}: no packed rows to cache (the documents hold no tokens)")
            log(f"{count} rows of {data.seq_len} tokens to cache in {directory}")
            manifest = {**identity, "rows": count, "rows_done": 0, "tokens_done": 0, "complete": False}
            _write_manifest(directory, manifest)

        resumed_from = manifest["rows_done"]
        arrays = _open_arrays(directory, manifest, create_rows=batch_size if resumed_from == 0 else None)
        forward = _teacher_top_k(teacher_config, k)
        batches = iter(train_batches(data, tokenizer, shard_index=0, shard_count=1, documents=documents))
        pending = None  # (rows committed once its writes finish, tokens, write futures)
        last_log = time.perf_counter()
        try:
            start = resumed_from
            for rows in _row_batches(batches, batch_size, skip=resumed_from):
                n = len(rows["inputs"])
                if start + n > manifest["rows"]:
                    raise RuntimeError(f"the pipeline gave more than the {manifest['rows']} rows it counted (it should be "
                                       "deterministic; this is a bug)")
                teacher = forward(teacher_params, _pad_rows(rows, batch_size))  # dispatched; runs while we commit
                if pending is not None:
                    _commit(directory, manifest, *pending)
                outputs = {**rows, "teacher_ids": np.asarray(teacher.ids)[:n],
                           "teacher_log_probs": np.asarray(teacher.log_probs)[:n].astype(np.float16)}
                futures = [arrays[name][start : start + n].write(value) for name, value in outputs.items()]
                start += n
                pending = (start, int(np.count_nonzero(rows["segment_ids"])), futures)
                if time.perf_counter() - last_log > 10:
                    log(f"row {start} of {manifest['rows']} ({100 * start / manifest['rows']:.0f}%)")
                    last_log = time.perf_counter()
            if pending is not None:
                _commit(directory, manifest, *pending)
        finally:
            batches.close()  # stops the pipeline's prefetch thread
        if manifest["rows_done"] != manifest["rows"]:
            raise RuntimeError(f"the pipeline gave {manifest['rows_done']} rows where it counted {manifest['rows']} "
                               "(it should be deterministic; this is a bug)")
        manifest["complete"] = True
        _write_manifest(directory, manifest)
        log(f"wrote {manifest['rows']} rows of teacher top-{k} to {directory}")
        return _summary(directory, manifest, resumed_from=resumed_from, written=manifest["rows"] - resumed_from,
                        done=False, started=started)


@functools.lru_cache(maxsize=8)
def _teacher_top_k(config: decoder.DecoderConfig, k: int):
    """The jitted teacher forward and top-k; one per (config, k), so a process that writes several
    caches of one teacher compiles it once."""

    @jax.jit
    def run(params, batch):
        logits = decoder.forward(params, batch["inputs"], config, segment_ids=batch["segment_ids"],
                                 positions=batch["positions"]).logits  # [B, T, V] float32
        return top_k(logits, k)  # ids, log_probs [B, T, k]

    return run


def _count_rows(data: DataConfig, tokenizer: Any, documents: list) -> int:
    batches = iter(train_batches(data, tokenizer, shard_index=0, shard_count=1, documents=documents))
    try:
        return sum(len(batch["inputs"]) for batch in _without_padding_rows(batches))
    finally:
        batches.close()


def _without_padding_rows(batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's batches less the padding rows (no segment) that complete a finite pass's last batch."""
    for batch in batches:
        real = batch["segment_ids"].any(axis=1)  # [rows]
        yield batch if real.all() else {key: value[real] for key, value in batch.items()}


def _row_batches(batches: Iterator[dict[str, np.ndarray]], size: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
    """The pipeline's rows, after the first `skip`, regrouped into batches of `size` rows (the last
    may be smaller); padding rows are left out."""
    held: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in _without_padding_rows(batches):
        rows = len(batch["inputs"])
        if skip >= rows:
            skip -= rows
            continue
        batch = {key: value[skip:] for key, value in batch.items()}
        skip = 0
        held.append(batch)
        count += len(batch["inputs"])
        while count >= size:
            joined = {key: np.concatenate([b[key] for b in held]) for key in BATCH_KEYS}
            yield {key: value[:size] for key, value in joined.items()}
            held = [{key: value[size:] for key, value in joined.items()}]
            count -= size
    if count:
        yield {key: np.concatenate([b[key] for b in held]) for key in BATCH_KEYS}


def _pad_rows(rows: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """`rows` with padding rows (segment 0) appended up to `size`: one compiled shape for every batch."""
    missing = size - len(rows["inputs"])
    if not missing:
        return rows
    return {key: np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
            for key, value in rows.items()}


def _commit(directory: str, manifest: dict, rows_done: int, tokens: int, futures: list) -> None:
    """Wait for a batch's writes, then record its rows as done: the manifest never runs ahead of the arrays."""
    for future in futures:
        future.result()
    manifest["rows_done"] = rows_done
    manifest["tokens_done"] += tokens
    _write_manifest(directory, manifest)


def _summary(directory, manifest, *, resumed_from, written, done, started) -> CacheSummary:
    return CacheSummary(directory, manifest["rows"], manifest["tokens_done"], manifest["seq_len"], manifest["k"],
                        resumed_from, written, done, round(time.perf_counter() - started, 3))


def _refuse_another_cache(manifest: dict, identity: dict, directory: str) -> None:
    """InputError naming the first field where the cache in `directory` differs from what is asked."""
    def differs(name: str, cached: Any, now: Any) -> InputError:
        return InputError(f"{directory} holds a teacher cache of another {name} ({cached} cached, {now} now); "
                          "rerun with the settings it was written with to continue it, or write to another "
                          "directory (out=...)")

    if manifest.get("format") != FORMAT_VERSION:
        raise InputError(f"{directory}: a teacher cache of format {manifest.get('format')!r}, not {FORMAT_VERSION}; "
                         "write a new one (delete the directory or choose another out)")
    teacher, now = manifest["teacher"], identity["teacher"]
    if teacher["config"] != now["config"]:
        keys = sorted(key for key in set(teacher["config"]) | set(now["config"])
                      if teacher["config"].get(key) != now["config"].get(key))
        raise differs("teacher config", {key: teacher["config"].get(key) for key in keys},
                      {key: now["config"].get(key) for key in keys})
    if teacher["fingerprint"] != now["fingerprint"]:
        raise differs("teacher (its weights' fingerprint differs)", f"{teacher['name']} {teacher['fingerprint'][:12]}",
                      f"{now['name']} {now['fingerprint'][:12]}")
    if manifest["tokenizer"] != identity["tokenizer"]:
        raise differs("tokenizer (its fingerprint differs)", manifest["tokenizer"][:12], identity["tokenizer"][:12])
    cached_data, now_data = _data_keys(manifest["data"]), _data_keys(identity["data"])
    if cached_data != now_data:
        keys = sorted(key for key in now_data if cached_data.get(key) != now_data[key])
        raise differs(f"data ({', '.join(keys)})", {key: cached_data.get(key) for key in keys},
                      {key: now_data[key] for key in keys})
    if manifest["documents"] != identity["documents"]:
        raise differs("data (the documents' contents changed)", manifest["documents"][:12], identity["documents"][:12])
    if manifest["k"] != identity["k"]:
        raise differs("k", manifest["k"], identity["k"])


def _data_keys(data: dict) -> dict:
    return {key: value for key, value in data.items() if key not in _DATA_KEYS_IGNORED}


def _require_new(directory: str) -> None:
    if os.path.isdir(directory) and set(os.listdir(directory)) - {LOCK}:
        raise InputError(f"{directory} is not empty and holds no teacher cache (no {MANIFEST}); give a new or empty "
                         "directory")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise InputError(f"{directory} is a file; give a new or empty directory for the teacher cache")


# ----------------------------------------------------------------------------- the manifest and arrays


def _read_manifest(directory: str) -> dict | None:
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the teacher cache's manifest ({e}); write the cache again into a new "
                         "directory") from None


def _write_manifest(directory: str, manifest: dict) -> None:
    """Replace the manifest atomically: a reader or a resumed writer sees the old one or the new one."""
    path = os.path.join(directory, MANIFEST)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _open_arrays(directory: str, manifest: dict, *, create_rows: int | None, k: int | None = None,
                 read_only: bool = False) -> dict[str, ts.TensorStore]:
    """The cache's arrays: created anew (shards of `create_rows` rows) or opened; teacher arrays
    cut to their first `k` entries when k is given."""
    rows, seq_len = manifest["rows"], manifest["seq_len"]
    context = ts.Context()
    futures = {}
    for name, (dtype, rank) in ARRAYS.items():
        shape = [rows, seq_len] + ([manifest["k"]] if rank == 3 else [])
        spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(directory, name)}}
        if create_rows is not None:
            spec["metadata"] = _metadata(shape, dtype, create_rows)
            futures[name] = ts.open(spec, create=True, delete_existing=True, context=context)
        else:
            futures[name] = ts.open(spec, open=True, read=True, write=not read_only, context=context)
    arrays = {}
    for name, future in futures.items():
        try:
            array = future.result()
        except ValueError as e:
            raise InputError(f"{os.path.join(directory, name)}: cannot open the teacher cache's array ({e}); write "
                             "the cache again into a new directory") from None
        dtype, rank = ARRAYS[name]
        shape = (rows, seq_len) + ((manifest["k"],) if rank == 3 else ())
        if tuple(array.shape) != shape or array.dtype.name != dtype:
            raise InputError(f"{os.path.join(directory, name)}: {array.dtype.name} {tuple(array.shape)} where the "
                             f"manifest says {dtype} {shape}; write the cache again into a new directory")
        arrays[name] = array[..., :k] if rank == 3 and k is not None else array
    return arrays


def _metadata(shape: list[int], dtype: str, shard_rows: int) -> dict:
    """zarr3 metadata: shards of `shard_rows` rows, one zstd-compressed chunk per row inside."""
    little = {"name": "bytes", "configuration": {"endian": "little"}}
    return {
        "shape": shape,
        "data_type": dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [min(shard_rows, shape[0]), *shape[1:]]}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [1, *shape[1:]],
            "codecs": [little, {"name": "zstd", "configuration": {"level": 3}}],
            "index_codecs": [little, {"name": "crc32c"}],
        }}],
    }


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so a config read back from the manifest compares equal."""
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class CacheExpectation:
    """What a distillation run needs of a teacher cache; a None field is not checked."""

    teacher: str | None = None  # teacher_fingerprint(params) of the run's teacher, when it has them
    teacher_name: str | None = None  # how the run names its teacher (paths compare by where they lead)
    teacher_config: decoder.DecoderConfig | None = None  # the run's teacher config, dtypes included
    tokenizer: str | None = None  # tokenizer_fingerprint(...) of the student's tokenizer (the teacher's must equal it)
    seq_len: int | None = None  # the run's row length
    k: int | None = None  # the top k the run's loss uses: the cache must hold at least k; readers yield the first k

    @classmethod
    def of(cls, *, teacher_params: Any = None, teacher_name: str | None = None,
           teacher_config: decoder.DecoderConfig | None = None, tokenizer: Any = None, seq_len: int | None = None,
           k: int | None = None) -> CacheExpectation:
        """An expectation from the objects themselves (fingerprints computed here)."""
        return cls(None if teacher_params is None else teacher_fingerprint(teacher_params), teacher_name,
                   teacher_config, None if tokenizer is None else tokenizer_fingerprint(tokenizer), seq_len, k)


class TeacherCacheSource:
    """A complete teacher cache as a Grain RandomAccessDataSource: row i is a dict of numpy arrays,
    inputs, targets, segment_ids, positions [T] int32, loss_mask [T] float32, teacher_ids [T, k]
    int32 and teacher_log_probs [T, k] float16. Open one with `open_cache`."""

    def __init__(self, directory: str, manifest: dict, k: int):
        self.directory = directory
        self.manifest = manifest
        self.k = k
        self._arrays = _open_arrays(directory, manifest, create_rows=None, k=k, read_only=True)

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]

    def __len__(self) -> int:
        return self.manifest["rows"]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} of a teacher cache of {len(self)} rows")
        return {name: value[0] for name, value in self.read_rows([index % len(self)]).items()}

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Grain's batched read: the rows as one read per array."""
        rows = self.read_rows(indices)
        return [{name: value[i] for name, value in rows.items()} for i in range(len(indices))]

    def read_rows(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """Rows `indices` (any order, repeats allowed) of every array, [len(indices), ...]: every read
        issued at once, each decoding only its rows' chunks."""
        indices = np.asarray(indices, np.int64)
        futures = {name: array[indices].read() for name, array in self._arrays.items()}
        return {name: future.result() for name, future in futures.items()}

    def __repr__(self) -> str:
        return f"TeacherCacheSource({self.directory!r}, rows={len(self)}, k={self.k})"


def open_cache(directory: str, *, expect: CacheExpectation | None = None) -> TeacherCacheSource:
    """The complete teacher cache in `directory`, checked against `expect`.

    Raises InputError naming what is wrong: no cache, an incomplete one (rerun press teacher-cache),
    or a teacher, tokenizer, seq_len or k other than `expect`'s.
    """
    manifest = _read_manifest(directory)
    if manifest is None:
        raise InputError(f"{directory}: no teacher cache here (no {MANIFEST}); write one with press teacher-cache")
    if manifest.get("format") != FORMAT_VERSION:
        raise InputError(f"{directory}: a teacher cache of format {manifest.get('format')!r}, not {FORMAT_VERSION}; "
                         "write it again with press teacher-cache")
    if not manifest["complete"]:
        raise InputError(f"{directory}: the teacher cache is incomplete ({manifest['rows_done']} of {manifest['rows']} "
                         "rows); rerun the press teacher-cache command that wrote it to finish it")
    expect = expect or CacheExpectation()
    _check_expectation(manifest, directory, expect)
    return TeacherCacheSource(directory, manifest, expect.k or manifest["k"])


def check_for_training(
    cache: TeacherCacheSource,
    *,
    teacher_name: str | None = None,
    teacher_config: decoder.DecoderConfig | None = None,
    tokenizer: Any = None,
    seq_len: int | None = None,
    k: int | None = None,
    teacher_params: Any = None,
) -> None:
    """InputError unless the opened `cache` was written by this teacher (its name, its config and,
    when given, its weights), with this tokenizer and row length, and holds at least k tokens per
    position: what a distillation run that never loads its teacher can still check. None: not checked."""
    expect = CacheExpectation.of(teacher_params=teacher_params, teacher_name=teacher_name,
                                 teacher_config=teacher_config, tokenizer=tokenizer, seq_len=seq_len, k=k)
    _check_expectation(cache.manifest, cache.directory, expect)


def _check_expectation(manifest: dict, directory: str, expect: CacheExpectation) -> None:
    teacher = manifest["teacher"]
    if expect.teacher_name is not None and not _same_model(teacher["name"], expect.teacher_name):
        raise InputError(f"{directory}: the cache was written by the teacher {teacher['name']}, not the run's "
                         f"{expect.teacher_name}; write a cache of this teacher with press teacher-cache")
    if expect.teacher_config is not None:
        now = _plain(dataclasses.asdict(expect.teacher_config))
        keys = sorted(key for key in set(teacher["config"]) | set(now) if teacher["config"].get(key) != now.get(key))
        if keys:
            raise InputError(f"{directory}: the cache's teacher config differs from the run's in "
                             + ", ".join(f"{key} ({teacher['config'].get(key)!r} cached, {now.get(key)!r} now)"
                                         for key in keys)
                             + "; run the teacher as the cache did, or write a cache with press teacher-cache")
    if expect.teacher is not None and expect.teacher != teacher["fingerprint"]:
        raise InputError(f"{directory}: the cache was written by another teacher ({teacher['name']}, weights "
                         f"fingerprint {teacher['fingerprint'][:12]}, not the run's {expect.teacher[:12]}); "
                         "write a cache of this teacher with press teacher-cache")
    if expect.tokenizer is not None and expect.tokenizer != manifest["tokenizer"]:
        raise InputError(f"{directory}: the cache's tokenizer (fingerprint {manifest['tokenizer'][:12]}) is not the "
                         f"run's ({expect.tokenizer[:12]}); a student distils from a teacher with its tokenizer")
    if expect.seq_len is not None and expect.seq_len != manifest["seq_len"]:
        raise InputError(f"{directory}: the cache holds rows of seq_len {manifest['seq_len']}, not the run's "
                         f"{expect.seq_len}; use seq_len {manifest['seq_len']} or write a cache with data.seq_len="
                         f"{expect.seq_len}")
    if expect.k is not None and expect.k < 1:
        raise InputError(f"k={expect.k}: a run reads at least 1 of the teacher's top tokens")
    if expect.k is not None and expect.k > manifest["k"]:
        raise InputError(f"{directory}: the cache holds the teacher's top {manifest['k']}, fewer than the run's "
                         f"k={expect.k}; use k <= {manifest['k']} or write a cache with top_k={expect.k}")


def _same_model(cached: str, now: str) -> bool:
    """Whether two names of a model lead to the same place (a bundled name, or paths however written)."""
    if cached == now:
        return True
    try:
        return os.path.realpath(resolve(cached).path) == os.path.realpath(resolve(now).path)
    except (InputError, OSError):
        return False  # one of them no longer resolves: only the same name will do


def cache_batches(
    directory: str,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = None,
    expect: CacheExpectation | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Batches of cache rows, as a checkpointable Grain iterator.

    Args:
      directory: a complete cache (open_cache checks it against `expect`).
      batch_size: rows per global batch, over all processes (a multiple of shard_count).
      seed, shuffle: every epoch in its own seeded random order; shuffle=False: in the cache's order.
      epochs: passes over the rows; None: forever. Batches run across epoch boundaries; only the
        last, incomplete batch of a finite run is dropped (every batch has batch_size rows).
      shard_index, shard_count: this process's rows [i*rows, (i+1)*rows) of each global batch;
        default jax.process_index() and jax.process_count().
      prefetch: batches read ahead in background threads (0: each read when asked).
    Returns:
      A grain.DatasetIterator of dicts of numpy arrays, [rows, T] (BATCH_KEYS) and [rows, T, k]
      (teacher_ids int32, teacher_log_probs float16); get_state() is JSON-serialisable and
      set_state() on a fresh iterator continues exactly. close() it when done (it stops the
      read-ahead threads).
    """
    source = open_cache(directory, expect=expect)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise InputError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if batch_size < 1 or batch_size % shard_count:
        raise InputError(f"batch_size={batch_size}: give a positive multiple of the {shard_count} processes")
    if batch_size > len(source):
        raise InputError(f"{directory}: {len(source)} rows, fewer than a batch of {batch_size}; give a smaller "
                         "batch_size or cache more data")
    if epochs is not None and epochs < 1:
        raise InputError(f"epochs={epochs}: give at least 1, or None for forever")
    if prefetch < 0:
        raise InputError(f"prefetch={prefetch}: give 0 or more batches")
    rows = grain.MapDataset.range(len(source))
    if shuffle:
        rows = rows.shuffle(seed=seed)
    rows = rows.repeat(epochs)  # reshuffled each epoch
    per_shard = batch_size // shard_count
    first = shard_index * per_shard
    batches = rows.batch(batch_size, drop_remainder=True).map(
        lambda indices: source.read_rows(indices[first : first + per_shard]))
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return iter(batches.to_iter_dataset(options))
