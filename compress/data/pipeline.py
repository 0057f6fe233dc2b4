"""Batches of packed rows to train on, through Grain: read, shuffle, shard, tokenize, pack, batch.

    config = DataConfig(sources=("pydoc", "stdlib"), seq_len=512, batch_size=8, seed=0)
    batches = iter(train_batches(config, tokenizer))  # this process's rows of each global batch
    batch = next(batches)           # a dict of numpy arrays, below
    state = batches.get_state()     # JSON-serialisable; checkpoint it beside the train state
    batches.set_state(state)        # a fresh iterator given it yields exactly the next batches

The batch: every array is [rows, seq_len], rows = batch_size // shard_count.
  inputs       int32    token ids; 0 at padding
  targets      int32    the next token of the same document at each position; 0 at padding
  segment_ids  int32    1, 2, ... for the documents (or pieces of one) in a row; 0 at padding
  positions    int32    position in the document piece, from 0 (RoPE's positions)
  loss_mask    float32  1 where the target counts; 0 at padding and on chat tokens that are
                        not an assistant's (compress/data/examples.py)

Documents (sources.py, read and checked up front) -> MapDataset.source -> shuffle(seed), a new
order each epoch -> repeat(epochs) -> map(encode_document) -> drop empty ones ->
ConcatThenSplitIterDataset: documents laid end to end in rows of seq_len; the one that does not
fit is split and continues (from position 0) in the stream's next row. How the packed rows make
batches depends on whether the documents end:

Finite `epochs`: one stream, every token of every document once per epoch. All the documents
of all the epochs, in the seeded order, are packed into one stream of rows, and each batch is
its next batch_size rows (row k of the stream is row k mod batch_size of batch k // batch_size,
so a split document continues in the next row). Only the end has padding: the stream's last
row is filled up with it, and the last batch is completed with padding rows (loss_mask and
segment_ids 0 everywhere), so every process yields the same number of whole batches and no
token is lost. Process i of n yields rows [i*rows, (i+1)*rows) of each batch; to know where its
rows start, every process tokenizes and packs all the documents (and keeps only its rows).
A batch_size of 1 gives the same rows, one per batch.

`epochs` None (forever): one stream per row of the global batch, so each process tokenizes only
its own documents. Row r reads the documents r, r + batch_size, r + 2*batch_size, ... of the
endless shuffled sequence, packed as above (a split document continues in that row of the next
batch); process i zips its rows [i*rows, (i+1)*rows) into batches. The shards are disjoint
(document k of an epoch goes to row k mod batch_size only) and the batches are those one process
alone would yield. The rows' streams never end, so none waits on another; this needs at least
batch_size documents. (A finite pass cannot work this way: streams of unequal documents end at
different batches, and stopping at the first would drop most of the others' tokens.)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import grain
import jax
import numpy as np

from compress.data.examples import EXAMPLE_KEYS, Tokenizer, encode_document
from compress.data.sources import read_sources
from compress.errors import InputError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a training run reads, and how it is cut into batches."""

    sources: tuple[str, ...] = ("pydoc", "stdlib")  # built-in corpora ("pydoc", "stdlib"), text or .jsonl files, directories
    seq_len: int = 512  # tokens per packed row
    batch_size: int = 8  # rows per global batch, over all processes; a multiple of the process count
    seed: int = 0  # of the shuffle; the same seed gives the same batches
    shuffle: bool = True  # documents in a seeded random order, a new one each epoch; False: in the order read
    epochs: int | None = None  # passes over the documents, every token once each; None repeats them forever
    prefetch: int = 2  # batches prepared ahead in a background thread; 0 prepares each when asked
    errors: str | None = None  # a JSONL file recording bad lines, which are then skipped; None: the first stops the run

    def __post_init__(self):
        if not self.sources:
            raise InputError("DataConfig.sources is empty; name at least one file, directory or built-in corpus")
        for name, least in (("seq_len", 1), ("batch_size", 1), ("seed", 0), ("prefetch", 0), ("epochs", 1)):
            value = getattr(self, name)
            if name == "epochs" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise InputError(f"DataConfig.{name} must be an integer >= {least}, got {value!r}")
        if self.seed >= 2**32:
            raise InputError(f"DataConfig.seed must be below 2**32 (Grain's shuffle), got {self.seed}")


def train_batches(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
    documents: Sequence[Any] | None = None,
) -> grain.IterDataset:
    """This process's share of the training batches, as a Grain dataset (iterate it for batches).

    Args:
      config: sources, row length, global batch size, seed, epochs.
      tokenizer: `encode`, `eos_token_id` and (for chats) `apply_chat_template`; see examples.py.
      shard_index, shard_count: this process's place among those sharing each batch; default
        jax.process_index() and jax.process_count().
      documents: the documents to use instead of reading config.sources (already read ones).
    Returns:
      A grain.IterDataset of batches (module docstring); its iterators' get_state() is
      JSON-serialisable and set_state() restores it exactly.
    """
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token, which ends every text document; use a tokenizer with one")
    shard_index, shard_count = _shard(config, shard_index, shard_count)
    where = ", ".join(config.sources) if documents is None else "the documents given"
    documents = read_sources(config.sources, config.errors) if documents is None else list(documents)
    if not documents:
        raise InputError(f"{where}: no documents to train on (every file is empty or blank); give some text")
    if config.epochs is None and len(documents) < config.batch_size:
        raise InputError(
            f"{where}: {len(documents)} documents for batches of {config.batch_size} rows; with epochs None every "
            f"row reads its own documents, so give at least {config.batch_size} (more files or JSONL lines), a "
            f"smaller batch_size, or finite epochs"
        )

    ordered = grain.MapDataset.source(documents)
    if config.shuffle:
        ordered = ordered.shuffle(seed=config.seed)
    ordered = ordered.repeat(config.epochs)  # reshuffled each epoch
    rows_per_shard = config.batch_size // shard_count
    first = shard_index * rows_per_shard
    if config.epochs is None:
        rows = [  # row r packs the documents r, r + B, r + 2B, ...
            _packed_row_stream(ordered[row :: config.batch_size], tokenizer, config.seq_len)
            for row in range(first, first + rows_per_shard)
        ]
        batches = grain.experimental.ZipIterDataset(rows).map(_stack_rows)  # endless streams: none stops the zip
    else:  # one stream of all the documents; each batch its next batch_size rows, of which this process keeps its own
        mine = functools.partial(_shard_of_batch, rows=slice(first, first + rows_per_shard), seq_len=config.seq_len)
        batches = _packed_row_stream(ordered, tokenizer, config.seq_len).batch(config.batch_size, batch_fn=mine)
    if config.prefetch:
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch)
    return _JsonStateIterDataset(batches)


def _packed_row_stream(documents: grain.MapDataset, tokenizer: Tokenizer, seq_len: int) -> grain.IterDataset:
    """A stream of packed rows: the documents tokenized and laid end to end in rows of seq_len."""
    examples = documents.map(functools.partial(encode_document, tokenizer=tokenizer))
    examples = examples.filter(lambda example: len(example["inputs"]) > 0)
    # No reader threads: the documents are in memory, and the whole pipeline already runs in
    # one prefetch thread (Grain recommends num_threads=0 for in-memory data).
    examples = examples.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    packed = grain.experimental.ConcatThenSplitIterDataset(examples, length_struct={key: seq_len for key in EXAMPLE_KEYS})
    return packed.map(_batch_row)


def _batch_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The packer's output (segment ids and positions per feature, all equal) as one row of a batch."""
    return {
        "inputs": packed["inputs"].astype(np.int32),
        "targets": packed["targets"].astype(np.int32),
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
        "positions": packed["inputs_positions"].astype(np.int32),
        "loss_mask": packed["loss_mask"].astype(np.float32),
    }


def _stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_KEYS}  # each [rows, seq_len]


def _shard_of_batch(batch: Sequence[dict[str, np.ndarray]], *, rows: slice, seq_len: int) -> dict[str, np.ndarray]:
    """This process's `rows` of a global batch of packed rows, padding rows where the stream has
    ended (only the last batch is short)."""
    mine = list(batch[rows])
    padding = {key: np.zeros((seq_len,), np.float32 if key == "loss_mask" else np.int32) for key in BATCH_KEYS}
    return _stack_rows(mine + [padding] * (rows.stop - rows.start - len(mine)))


def _shard(config: DataConfig, shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise InputError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if config.batch_size % shard_count:
        raise InputError(
            f"DataConfig.batch_size={config.batch_size} rows cannot be shared by {shard_count} processes; "
            f"give a multiple of {shard_count}"
        )
    return shard_index, shard_count


class _JsonStateIterDataset(grain.IterDataset):
    """Its parent, with iterators whose state survives a JSON round trip (what grain.checkpoint and
    Orbax write).

    Written by hand for a Grain bug (0.2.15 to 0.2.18 at least): its packer (ConcatThenSplit) compares
    its saved `remainder_slices` with a tuple; JSON turns the tuples into lists, and a packer
    restored from them skips a document. set_state turns them back into tuples.
    """

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonStateIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "JsonStateIterDataset"


class _JsonStateIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
    """`state` with every `remainder_slices` entry a tuple again."""
    if isinstance(state, dict):
        return {
            key: {k: tuple(v) for k, v in value.items()} if key == "remainder_slices" else _slices_as_tuples(value)
            for key, value in state.items()
        }
    if isinstance(state, list):
        return [_slices_as_tuples(item) for item in state]
    return state
