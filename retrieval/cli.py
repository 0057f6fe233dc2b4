"""The retrieval commands of `press`:

  press index build  --docs PATH... --index DIR [--encoder NAME] [--dtype f32|f16|i8]
                     [--chunk-tokens N] [--overlap N] [--exact] [--dense-only] [--connectivity N]
                     [--expansion-add N] [--expansion-search N] [--text-field NAME]
  press index add    --index DIR --docs PATH... [--text-field NAME]
  press index remove --index DIR --doc-id ID...
  press index search --index DIR "query" [-k N] [--json] [--exact] [--dense-only] [--view]
  press ask          --index DIR --model M "question" [-k N] [--json] [--max-new-tokens N]
                     [--min-score S] [--temperature T] [--seed S] [--max-seq-len N]

PATH is a file (.txt, .md, .jsonl), a directory (read recursively) or `pydoc:topics`, the
CPython language reference shipped with Python (retrieval/documents.py). `build` makes a
new index from the documents (replacing DIR's index, if any, only once the new one is
saved); `add` embeds new and changed documents into an existing index (a document whose id
is indexed is replaced, an unchanged one skipped); `remove` drops documents by id. Every
update is saved atomically (retrieval/store.py): a killed command leaves the index as it
was.

`search --json` prints one JSON list of hits; `ask` prints the answer, then the sources it
was given, numbered as cited ([1], [2], ...) with their file, heading and character
offsets; `ask --json` prints one JSON object (answer, found, cited, sources).
"""

from __future__ import annotations

import argparse
import json
import sys

from retrieval.chunking import ChunkingConfig
from retrieval.vector_index import DTYPES, IndexSettings

DEFAULT_ENCODER = "all-minilm-l6-v2"


# --- the parsers


def add_parser(subparsers) -> None:
    """Add `index` (build, add, remove, search) and `ask` to the `press` subcommands."""
    index = subparsers.add_parser("index", help="build, update and search a retrieval index",
                                  description=__doc__.split("\n\n")[0])
    actions = index.add_subparsers(dest="index_command", required=True)
    chunking, settings = ChunkingConfig(), IndexSettings()

    build = actions.add_parser("build", help="embed documents into a new index")
    _docs_args(build)
    build.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"sentence encoder (default {DEFAULT_ENCODER})")
    build.add_argument("--dtype", default=settings.dtype, choices=DTYPES, help="stored vector type")
    build.add_argument("--chunk-tokens", type=int, default=chunking.chunk_tokens,
                       help=f"encoder tokens per chunk, heading included (default {chunking.chunk_tokens})")
    build.add_argument("--overlap", type=int, default=chunking.overlap,
                       help=f"tokens shared by consecutive chunks (default {chunking.overlap})")
    build.add_argument("--exact", action="store_true", help="search by brute force by default (small corpora)")
    build.add_argument("--dense-only", action="store_true",
                       help="rank by embeddings alone by default, without fusing in keyword (BM25) matches")
    build.add_argument("--connectivity", type=int, default=settings.connectivity, help="HNSW edges per node")
    build.add_argument("--expansion-add", type=int, default=settings.expansion_add, help="HNSW build candidates")
    build.add_argument("--expansion-search", type=int, default=settings.expansion_search,
                       help="HNSW search candidates")
    build.add_argument("--encoder-quantization", metavar="SCHEME",
                       help="run the encoder on quantized weights (int8, w8a8, int4-g32, ...; recorded in the index)")
    build.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch (default 32; on a CPU smaller batches stay in cache)")

    add = actions.add_parser("add", help="add or replace documents in an index")
    _docs_args(add)

    remove = actions.add_parser("remove", help="remove documents from an index by id")
    remove.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    remove.add_argument("--doc-id", required=True, action="extend", nargs="+", metavar="ID",
                        help="document ids (a file's relative path, a JSONL id, or a pydoc topic)")

    search = actions.add_parser("search", help="print the chunks most similar to a query")
    search.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    search.add_argument("query", help="the query text")
    search.add_argument("-k", type=int, default=5, help="results (default 5)")
    search.add_argument("--json", action="store_true", help="print one JSON list of hits")
    search.add_argument("--exact", action="store_true", help="brute-force search instead of the HNSW graph")
    search.add_argument("--dense-only", action="store_true", help="rank by embeddings alone (no keyword matches)")
    search.add_argument("--view", action="store_true", help="memory-map the index instead of reading it")

    from retrieval.rag import DEFAULT_K, MIN_SCORE

    ask = subparsers.add_parser("ask", help="answer a question from an index, citing numbered sources")
    ask.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    ask.add_argument("--model", required=True, help="chat model: bundled name, Hugging Face directory or .gguf")
    ask.add_argument("question", help="the question")
    ask.add_argument("-k", type=int, default=DEFAULT_K, help=f"sources retrieved (default {DEFAULT_K})")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--min-score", type=float, default=MIN_SCORE,
                     help=f"hits below this cosine similarity are not relevant (default {MIN_SCORE})")
    ask.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    ask.add_argument("--seed", type=int)
    ask.add_argument("--max-seq-len", type=int, default=2048, help="the model's context for prompt + answer")
    ask.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _docs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--docs", required=True, action="extend", nargs="+", metavar="PATH",
                   help="files (.txt .md .jsonl), directories, or pydoc:topics")
    p.add_argument("--index", required=True, metavar="DIR", help="the index directory")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default 'text')")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- the commands


def run(args: argparse.Namespace, out=None) -> int:
    """Run `press index ...` or `press ask`; 0 on success, 2 on an error (printed to stderr)."""
    out = out or sys.stdout
    name = "ask" if args.command == "ask" else f"index {args.index_command}"
    try:
        if args.command == "ask":
            return ask(args, out)
        return {"build": build, "add": add, "remove": remove, "search": search}[args.index_command](args, out)
    except (KeyError, PermissionError) as e:  # unknown document ids; a read-only (viewed) index
        sys.stderr.write(f"press {name}: error: {e.args[0] if e.args else e}\n")
        return 2


def _progress(enabled: bool):
    """A rich progress bar on stderr as a Retriever.add progress callback (and its context)."""
    import contextlib

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


def build(args: argparse.Namespace, out) -> int:
    from retrieval import store
    from retrieval.documents import read_documents
    from retrieval.encoder import SentenceEncoder
    from retrieval.retriever import Retriever

    store.check_target(args.index)  # before any work
    settings = IndexSettings(args.dtype, args.connectivity, args.expansion_add, args.expansion_search)
    settings.validate()
    chunking = ChunkingConfig(args.chunk_tokens, args.overlap)
    chunking.validate()
    documents = read_documents(args.docs, text_field=args.text_field)
    encoder = SentenceEncoder.from_pretrained(args.encoder, batch_size=args.batch_size,
                                              quantization=args.encoder_quantization)
    retriever = Retriever(encoder, settings=settings, chunking=chunking, exact=args.exact, hybrid=not args.dense_only)
    replacing = store.is_index_dir(args.index)
    report = _add_with_progress(retriever, documents, not args.no_progress)
    manifest = retriever.save(args.index)
    out.write(f"{'rebuilt' if replacing else 'built'} {args.index}: {len(documents)} documents, {report.chunks} "
              f"chunks, {manifest['dim']}-d {manifest['dtype']} vectors, {manifest['vectors_bytes']} bytes\n")
    return 0


def add(args: argparse.Namespace, out) -> int:
    from retrieval.documents import read_documents
    from retrieval.retriever import Retriever

    documents = read_documents(args.docs, text_field=args.text_field)
    retriever = Retriever.load(args.index)  # with the encoder it was built with
    report = _add_with_progress(retriever, documents, not args.no_progress)
    if report.chunks or report.added or report.replaced:
        retriever.save(args.index)
    out.write(f"{args.index}: {len(report.added)} documents added, {len(report.replaced)} replaced, "
              f"{len(report.unchanged)} unchanged; {report.chunks} chunks embedded; "
              f"{len(retriever.documents())} documents, {len(retriever)} chunks in all\n")
    return 0


def remove(args: argparse.Namespace, out) -> int:
    from retrieval.retriever import Retriever

    retriever = Retriever.load(args.index)
    removed = retriever.remove(args.doc_id)
    retriever.save(args.index)
    out.write(f"{args.index}: removed {len(set(args.doc_id))} documents ({removed} chunks); "
              f"{len(retriever.documents())} documents, {len(retriever)} chunks left\n")
    return 0


def search(args: argparse.Namespace, out) -> int:
    from retrieval.retriever import Retriever

    retriever = Retriever.load(args.index, view=args.view)
    hits = retriever.search(args.query, args.k, exact=True if args.exact else None,
                            hybrid=False if args.dense_only else None)
    if args.json:
        out.write(json.dumps([h.to_json() for h in hits], ensure_ascii=False) + "\n")
        return 0
    if not hits:
        out.write("no results: the index is empty\n")
    for rank, h in enumerate(hits, start=1):
        text = " ".join(h.text.split())
        out.write(f"{rank}. {h.score:.3f}  {h.location()}\n   {text[:240]}{'...' if len(text) > 240 else ''}\n")
    return 0


def ask(args: argparse.Namespace, out) -> int:
    from retrieval.rag import RagPipeline, unanswered
    from retrieval.retriever import Retriever
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    retriever = Retriever.load(args.index)
    hits = retriever.search(args.question, args.k)
    if not any(h.score >= args.min_score for h in hits):  # said plainly, without loading the model
        answer = unanswered(args.question, hits[0].score if hits else None, args.min_score)
    else:
        with Engine.from_pretrained(args.model, dtype=args.dtype, max_slots=1,
                                    max_seq_len=args.max_seq_len) as engine:
            pipeline = RagPipeline(retriever, engine, k=args.k, min_score=args.min_score)
            answer = pipeline.answer(args.question, sampling=sampling)
    if args.json:
        out.write(json.dumps(answer.to_json(), ensure_ascii=False) + "\n")
        return 0
    out.write(answer.text + "\n")
    if answer.sources:
        out.write("\nSources:\n")
        for s in answer.sources:
            mark = "cited" if s.number in answer.cited else "not cited"
            out.write(f"[{s.number}] {s.hit.location()} (score {s.hit.score:.2f}, {mark})\n")
    return 0
