"""`press index`: build, update and search a retrieval index.

  press index build  [configs/index.yaml] --docs PATH... --index DIR [--encoder NAME] [key=value ...]
  press index add    --index DIR --docs PATH... [--text-field NAME]
  press index remove --index DIR --doc-id ID...
  press index search --index DIR "query" [-k N] [--json] [--exact] [--dense-only] [--view]

PATH is a file (.txt, .md, .jsonl), a directory (read recursively) or `pydoc:topics`, the
CPython language reference shipped with Python (retrieval/documents.py). `build` makes a
new index from the documents (replacing DIR's index, if any, only once the new one is
saved); `add` embeds new and changed documents into an existing index (a document whose id
is indexed is replaced, an unchanged one skipped); `remove` drops documents by id. Every
update is saved atomically (retrieval/store.py): a killed command leaves the index as it
was. Updates of one index run one at a time: each holds the index's writer lock from
loading it to saving it (retrieval/locks.py), so two at once both land; searches never wait.
A file's document id is its path relative to the index's document root (recorded when files
are first indexed: the directory above the paths given, so `--docs notes/` gives ids
`notes/...`), whatever the current directory of a later `add`. `search --json` prints one JSON list of hits.

Each action reads a typed config (IndexBuildConfig, ...): YAML file, flags, key=value.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys

from compress import config as cfg
from compress.errors import InputError
from retrieval.chunking import ChunkingConfig
from retrieval.vector_index import DTYPES, IndexSettings

HELP = "build, update and search a retrieval index"
DEFAULT_ENCODER = "all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class IndexBuildConfig:
    """`press index build`: embed documents into a new index."""

    docs: tuple[str, ...]  # files (.txt .md .jsonl), directories, or pydoc:topics
    index: str  # the index directory (replaced only once the new index is saved)
    encoder: str = DEFAULT_ENCODER  # sentence encoder: bundled name or Hugging Face directory
    encoder_quantization: str | None = None  # run the encoder on quantized weights (int8, w8a8, int4-g32, ...)
    batch_size: int = 32  # texts per encoder batch (on a CPU smaller batches stay in cache)
    settings: IndexSettings = IndexSettings()  # stored vector type and HNSW graph settings
    chunking: ChunkingConfig = ChunkingConfig()  # encoder tokens per chunk and overlap
    exact: bool = False  # search by brute force by default (small corpora)
    dense_only: bool = False  # rank by embeddings alone by default, without keyword (BM25) matches
    text_field: str = "text"  # the JSONL field holding the text
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self):
        if not self.docs:
            raise ValueError("docs is empty; give files, directories or pydoc:topics")
        cfg.require_at_least(self, 1, "batch_size")
        self.settings.validate()
        self.chunking.validate()


@dataclasses.dataclass(frozen=True)
class IndexAddConfig:
    """`press index add`: add or replace documents in an index."""

    docs: tuple[str, ...]
    index: str
    text_field: str = "text"
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class IndexRemoveConfig:
    """`press index remove`: remove documents by id."""

    index: str
    doc_ids: tuple[str, ...]  # a file's path from the index's document root, a JSONL id, or a pydoc topic


@dataclasses.dataclass(frozen=True)
class IndexSearchConfig:
    """`press index search`: the chunks most similar to a query."""

    index: str
    query: str
    k: int = 5  # results
    exact: bool = False  # brute-force search instead of the HNSW graph
    dense_only: bool = False  # rank by embeddings alone (no keyword matches)
    view: bool = False  # memory-map the index instead of reading it

    def __post_init__(self):
        cfg.require_at_least(self, 1, "k")


# --- the parsers


def add_arguments(index: argparse.ArgumentParser) -> None:
    """`index` build, add, remove and search."""
    actions = index.add_subparsers(dest="index_command", required=True)

    build = cfg.add_config_arguments(actions.add_parser("build", help="embed documents into a new index"),
                                     IndexBuildConfig)
    _docs_flags(build)
    build.flag("--encoder", key="encoder", help="sentence encoder")
    build.flag("--dtype", key="settings.dtype", choices=DTYPES, help="stored vector type")
    build.flag("--chunk-tokens", key="chunking.chunk_tokens", type=int,
               help="encoder tokens per chunk, heading included")
    build.flag("--overlap", key="chunking.overlap", type=int, help="tokens shared by consecutive chunks")
    build.flag("--exact", key="exact", action="store_true", help="search by brute force by default (small corpora)")
    build.flag("--dense-only", key="dense_only", action="store_true",
               help="rank by embeddings alone by default, without fusing in keyword (BM25) matches")
    build.flag("--connectivity", key="settings.connectivity", type=int, help="HNSW edges per node")
    build.flag("--expansion-add", key="settings.expansion_add", type=int, help="HNSW build candidates")
    build.flag("--expansion-search", key="settings.expansion_search", type=int, help="HNSW search candidates")
    build.flag("--encoder-quantization", key="encoder_quantization", metavar="SCHEME",
               help="run the encoder on quantized weights (int8, w8a8, int4-g32, ...; recorded in the index)")
    build.flag("--batch-size", key="batch_size", type=int, help="texts per encoder batch")

    add = cfg.add_config_arguments(actions.add_parser("add", help="add or replace documents in an index"),
                                   IndexAddConfig)
    _docs_flags(add)

    remove = cfg.add_config_arguments(actions.add_parser("remove", help="remove documents from an index by id"),
                                      IndexRemoveConfig)
    remove.flag("--index", key="index", metavar="DIR", help="the index directory")
    remove.flag("--doc-id", key="doc_ids", action="extend", nargs="+", metavar="ID",
                help="document ids (a file's relative path, a JSONL id, or a pydoc topic)")

    search_parser = actions.add_parser("search", help="print the chunks most similar to a query")
    search = cfg.add_config_arguments(search_parser, IndexSearchConfig, positional="query")
    search.flag("--index", key="index", metavar="DIR", help="the index directory")
    search.flag("-k", key="k", type=int, help="results")
    search.flag("--exact", key="exact", action="store_true", help="brute-force search instead of the HNSW graph")
    search.flag("--dense-only", key="dense_only", action="store_true", help="rank by embeddings alone")
    search.flag("--view", key="view", action="store_true", help="memory-map the index instead of reading it")
    search_parser.add_argument("--json", action="store_true", help="print one JSON list of hits")


def _docs_flags(flags: cfg.ConfigFlags) -> None:
    flags.flag("--docs", key="docs", action="extend", nargs="+", metavar="PATH",
               help="files (.txt .md .jsonl), directories, or pydoc:topics")
    flags.flag("--index", key="index", metavar="DIR", help="the index directory")
    flags.flag("--text-field", key="text_field", help="the JSONL field holding the text")
    flags.flag("--no-progress", key="progress", action="store_false", help="no progress bar")


# --- the commands


def run(args: argparse.Namespace, out=None) -> int:
    """Run `press index ACTION`; 0 on success."""
    out = out or sys.stdout
    config = cfg.config_from_args(args)
    try:
        if args.index_command == "search":
            return search(config, out, as_json=args.json)
        return {"build": build, "add": add, "remove": remove}[args.index_command](config, out)
    except (KeyError, PermissionError) as e:  # unknown document ids; a read-only (viewed) index
        raise InputError(e.args[0] if e.args else str(e)) from None


def _progress(enabled: bool):
    """A rich progress bar on stderr as a Retriever.add progress callback (and its context)."""
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                    TimeRemainingColumn(), console=Console(stderr=True))


def _add_with_progress(retriever, documents, show: bool):
    with _progress(show) as bar:
        if bar is None:
            return retriever.add(documents)
        task = bar.add_task("embedding", total=None)
        return retriever.add(documents, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _waiting(index: str):
    """An on_wait callback: say why an update is not starting."""
    return lambda: sys.stderr.write(f"press index: {index} is being updated by another process; waiting for it\n")


def build(config: IndexBuildConfig, out) -> int:
    from retrieval import store
    from retrieval.documents import read_documents
    from retrieval.encoder import SentenceEncoder
    from retrieval.retriever import Retriever

    store.check_target(config.index)  # before any work
    documents = read_documents(config.docs, text_field=config.text_field)  # ids relative to document_root(docs)
    encoder = SentenceEncoder.from_pretrained(config.encoder, batch_size=config.batch_size,
                                              quantization=config.encoder_quantization)
    retriever = Retriever(encoder, settings=config.settings, chunking=config.chunking, exact=config.exact,
                          hybrid=not config.dense_only)
    replacing = store.is_index_dir(config.index)
    report = _add_with_progress(retriever, documents, config.progress)
    manifest = retriever.save(config.index, on_wait=_waiting(config.index))
    out.write(f"{'rebuilt' if replacing else 'built'} {config.index}: {len(documents)} documents, {report.chunks} "
              f"chunks, {manifest['dim']}-d {manifest['dtype']} vectors, {manifest['vectors_bytes']} bytes\n")
    return 0


def add(config: IndexAddConfig, out) -> int:
    from retrieval.documents import PYDOC_TOPICS, check_path, read_documents
    from retrieval.retriever import Retriever

    for path in config.docs:
        check_path(path)  # before the index loads
    with Retriever.updating(config.index, on_wait=_waiting(config.index)) as retriever:
        root = retriever.docs_root  # None: no files indexed yet, or an index from before roots were recorded
        if root is None and retriever.index_format == 1 and any(p != PYDOC_TOPICS for p in config.docs):
            # Its file ids are relative to the directory press ran in.
            root = os.getcwd()
            sys.stderr.write(f"press index: {config.index} predates recorded document roots; file ids are taken "
                             f"relative to the current directory, {root}, as before, and this directory is "
                             "recorded as its root\n")
        documents = read_documents(config.docs, text_field=config.text_field, root=root)
        report = _add_with_progress(retriever, documents, config.progress)
    out.write(f"{config.index}: {len(report.added)} documents added, {len(report.replaced)} replaced, "
              f"{len(report.unchanged)} unchanged; {report.chunks} chunks embedded; "
              f"{len(retriever.documents())} documents, {len(retriever)} chunks in all\n")
    return 0


def remove(config: IndexRemoveConfig, out) -> int:
    from retrieval.retriever import Retriever

    with Retriever.updating(config.index, on_wait=_waiting(config.index)) as retriever:
        removed = retriever.remove(list(config.doc_ids))
    out.write(f"{config.index}: removed {len(set(config.doc_ids))} documents ({removed} chunks); "
              f"{len(retriever.documents())} documents, {len(retriever)} chunks left\n")
    return 0


def search(config: IndexSearchConfig, out, *, as_json: bool = False) -> int:
    from retrieval.retriever import Retriever

    retriever = Retriever.load(config.index, view=config.view)
    hits = retriever.search(config.query, config.k, exact=True if config.exact else None,
                            hybrid=False if config.dense_only else None)
    if as_json:
        out.write(json.dumps([h.to_json() for h in hits], ensure_ascii=False) + "\n")
        return 0
    if not hits:
        out.write("no results: the index is empty\n")
    for rank, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        out.write(f"{rank}. {h.score:.3f}  {h.location()}\n   {text[:240]}{'...' if len(text) > 240 else ''}\n")
    return 0
