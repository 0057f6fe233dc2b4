"""Retrieval, one run with its peers: encoder throughput, ANN quality and speed, hit@k on the language reference.

1. Encoding. The chunks `press index build --docs pydoc:topics` indexes (the CPython language
   reference shipped with Python) embedded by the press encoder (JAX, length buckets) and by
   sentence-transformers (PyTorch) on the same texts, same batch size, both fp32 and warmed up:
   chunks/s of each, their ratio (press_fp32_over_sentence_transformers_fp32) and the cosine
   between their embeddings of every chunk.
2. ANN. Real embeddings: every distinct line of Python's own standard library sources
   (comments, docstrings and code of 4+ words, 24-200 characters; ~200k lines ship with
   CPython), shuffled with a fixed seed, embedded by the press MiniLM encoder: `--vectors`
   base vectors and `--queries` other lines as queries (cached in bench-results/, keyed by
   the texts, since embedding 100k lines takes this CPU several minutes). Ground truth: exact
   top-10 by NumPy over float32. USearch (through press's VectorIndex, f32/f16/i8) and FAISS HNSW
   (IndexHNSWFlat, inner product) with the same graph degree (M = 16) and build effort
   (efConstruction = 128), swept over the search effort: recall@10 and queries/s, batch search
   on every core (each effort searches the saved graph reopened with `VectorIndex.restore` and
   that expansion_search). Also build time and bytes per vector (the saved file's size / vectors).
   At matched recall, USearch f32 against FAISS f32 and against exact NumPy search.
3. Quality. hit@1 and hit@5 of compress/data/pydoc_questions.jsonl on that index, hybrid (default)
   and embedding-only.

  .venv/bin/python benchmarks/retrieve.py [--vectors 100000] [--queries 1000] [--out bench-results/retrieval.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import numpy as np

from common import log, write_result

EFFORTS = (16, 24, 32, 48, 64, 96, 128, 192, 256)
M, EF_CONSTRUCTION, K = 16, 128, 10


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def encoding(texts: list[str], batch_size: int) -> dict:
    from sentence_transformers import SentenceTransformer

    from compress.formats import registry
    from retrieval.encoder import SentenceEncoder

    press = SentenceEncoder.from_pretrained("all-minilm-l6-v2", batch_size=batch_size)
    press.encode(texts)  # compiles every length bucket these texts use
    ours, press_s = timed(press.encode, texts)
    st = SentenceTransformer(registry.resolve("all-minilm-l6-v2").path, device="cpu")
    st.max_seq_length = press.max_length
    st.encode(texts[: batch_size * 2], batch_size=batch_size)  # warm
    theirs, st_s = timed(st.encode, texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    cosine = np.sum(ours * theirs, axis=1)
    row = {"chunks": len(texts), "batch_size": batch_size, "max_length": press.max_length,
           "press_chunks_per_s": len(texts) / press_s, "sentence_transformers_chunks_per_s": len(texts) / st_s,
           "press_fp32_over_sentence_transformers_fp32": st_s / press_s,
           "min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean())}
    log(f"encoding: {row}")
    return row


def stdlib_lines(count: int, seed: int = 0) -> list[str]:
    """`count` distinct text lines of the standard library's .py files, in a seeded random order."""
    import glob
    import sysconfig

    lines = set()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            line = line.strip().lstrip("#").strip()
            if len(line.split()) >= 4 and 24 <= len(line) <= 200:
                lines.add(line)
    if len(lines) < count:
        raise SystemExit(f"the standard library has {len(lines)} distinct lines, fewer than the {count} asked for")
    order = np.random.default_rng(seed).permutation(len(lines))[:count]
    ordered = sorted(lines)
    return [ordered[i] for i in order]


def embeddings(texts: list[str], batch_size: int, cache_dir: str) -> np.ndarray:
    """MiniLM embeddings of texts [n, D], from a cache file named by the texts' hash when present."""
    import hashlib

    from retrieval.encoder import SentenceEncoder

    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"minilm-stdlib-{len(texts)}-{digest}.npy")
    if os.path.exists(path):
        return np.load(path)
    encoder = SentenceEncoder.from_pretrained("all-minilm-l6-v2", batch_size=batch_size)
    start, out = time.perf_counter(), []
    for at in range(0, len(texts), 8192):
        out.append(encoder.encode(texts[at : at + 8192]))
        log(f"embedded {at + len(out[-1])}/{len(texts)} lines in {time.perf_counter() - start:.0f} s")
    vectors = np.concatenate(out)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, vectors)
    return vectors


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most similar base rows per query, best first: [q, k]."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), 256):
        sim = queries[start : start + 256] @ base.T  # [b, n]
        best = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, best, axis=1), axis=1)
        out[start : start + 256] = np.take_along_axis(best, order, axis=1)
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / truth.shape[1] for f, t in zip(found, truth)]))


def ann(n: int, q: int, batch_size: int, cache_dir: str) -> dict:
    import faiss

    from retrieval.vector_index import IndexSettings, VectorIndex

    vectors = embeddings(stdlib_lines(n + q), batch_size, cache_dir)
    base, queries = vectors[:n], vectors[n:]
    truth, exact_s = timed(exact_top, base, queries, K)
    out = {"vectors": n, "queries": q, "dim": base.shape[1], "k": K, "M": M, "ef_construction": EF_CONSTRUCTION,
           "threads": os.cpu_count(), "exact_numpy_qps": q / exact_s, "usearch": {}, "faiss": {}}
    log(f"exact: {q / exact_s:.0f} queries/s")
    keys = np.arange(n, dtype=np.uint64)
    for dtype in ("f32", "f16", "i8"):
        settings = IndexSettings(dtype, M, EF_CONSTRUCTION, 64)
        index = VectorIndex(base.shape[1], settings)
        _, build_s = timed(index.add, keys, base)
        sweep = []
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "v.usearch")
            index.save(path)
            size = os.path.getsize(path)
            del index
            for ef in EFFORTS:
                # The same graph, opened with search effort ef (loaded into memory, not mapped).
                searcher = VectorIndex.restore(path, base.shape[1], dataclasses.replace(settings, expansion_search=ef))
                (found, _), s = timed(searcher.search, queries, K)
                sweep.append({"ef": ef, "recall": recall(found.astype(np.int64), truth), "qps": q / s})
                del searcher
        out["usearch"][dtype] = {"build_s": build_s, "bytes_per_vector": size / n, "sweep": sweep}
        log(f"usearch {dtype}: build {build_s:.1f} s, {size / n:.0f} B/vector, {sweep}")
    index = faiss.IndexHNSWFlat(base.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    _, build_s = timed(index.add, base)
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index, os.path.join(tmp, "v.faiss"))
        size = os.path.getsize(os.path.join(tmp, "v.faiss"))
    sweep = []
    for ef in EFFORTS:
        index.hnsw.efSearch = ef
        (_, found), s = timed(index.search, queries, K)
        sweep.append({"ef": ef, "recall": recall(found, truth), "qps": q / s})
    out["faiss"]["f32"] = {"build_s": build_s, "bytes_per_vector": size / n, "sweep": sweep}
    log(f"faiss f32: build {build_s:.1f} s, {size / n:.0f} B/vector, {sweep}")
    # Matched recall: the fastest setting of each that reaches the target.
    out["matched"] = {}
    for target in (0.95, 0.98, 0.99):
        best = lambda sweep: max((s["qps"] for s in sweep if s["recall"] >= target), default=None)
        u, f = best(out["usearch"]["f32"]["sweep"]), best(out["faiss"]["f32"]["sweep"])
        exact = out["exact_numpy_qps"]
        out["matched"][str(target)] = {"usearch_f32_qps": u, "faiss_f32_qps": f,
                                       "usearch_f32_over_faiss_f32": None if not (u and f) else u / f,
                                       "usearch_f32_over_exact_numpy_f32": None if not u else u / exact}
    return out


def quality(retriever) -> dict:
    from compress.data.corpus import PYDOC_QUESTIONS
    from retrieval.quality import hit_rates, read_questions

    questions = read_questions(PYDOC_QUESTIONS)
    out = {"questions": len(questions)}
    for name, hybrid in (("hybrid", True), ("dense_only", False)):
        rates = hit_rates(retriever, questions, (1, 5), hybrid=hybrid)
        out[name] = {"hit@1": rates["hit@1"], "hit@5": rates["hit@5"], "misses@5": rates["misses"][5]}
    log(f"quality: {out}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per batch for both encoders (sentence-transformers' default)")
    parser.add_argument("--parts", default="encoding,ann,quality", help="which of the three to run")
    parser.add_argument("--out", default="bench-results/retrieval.json")
    args = parser.parse_args()
    parts = set(args.parts.split(","))

    from retrieval.documents import pydoc_documents
    from retrieval.encoder import SentenceEncoder
    from retrieval.retriever import Retriever

    documents = pydoc_documents()
    retriever = Retriever(SentenceEncoder.from_pretrained("all-minilm-l6-v2"))
    texts = [c.embed_text for d in documents for c in retriever.chunk(d)]
    result = {}
    if "encoding" in parts:
        result["encoding"] = encoding(texts, args.batch_size)
        write_result(args.out, result)
    if "ann" in parts:
        result["ann"] = ann(args.vectors, args.queries, args.batch_size, os.path.dirname(args.out) or ".")
        write_result(args.out, result)
    if "quality" in parts:
        retriever.add(documents)
        result["quality"] = quality(retriever)
        write_result(args.out, result)


if __name__ == "__main__":
    main()
