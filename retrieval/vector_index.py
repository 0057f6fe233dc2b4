"""Unit vectors under integer keys, searched by cosine similarity: a USearch HNSW graph, or
exact (brute-force NumPy) search over the same stored vectors.

Scores are cosine similarities in [-1, 1] (USearch's cosine distance is 1 - similarity),
highest first. Exact search scores the vectors as stored (f16 or i8 vectors are rounded),
so with f32 storage it is the exact reference the approximate search is measured against.

Not thread-safe by itself: `Retriever` serialises updates and lets searches share a lock
(retrieval/locks.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from compress.errors import InputError

DTYPES = ("f32", "f16", "i8")


@dataclasses.dataclass(frozen=True)
class IndexSettings:
    """How vectors are stored and the HNSW graph is built and searched (USearch's names)."""

    dtype: str = "f32"  # stored scalar type: f32, f16 (half the bytes) or i8 (a quarter; scaled by 127)
    connectivity: int = 16  # graph edges per node (HNSW's M): more is better recall, more memory
    expansion_add: int = 128  # candidates kept while inserting (efConstruction): better graph, slower adds
    expansion_search: int = 64  # candidates kept while searching (ef): better recall, slower queries

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise InputError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for name in ("connectivity", "expansion_add", "expansion_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise InputError(f"{name}={value!r}; it must be an integer >= 2")


class VectorIndex:
    """A USearch index of `dim`-long vectors (metric cos) with exact search beside it."""

    def __init__(self, dim: int, settings: IndexSettings = IndexSettings(), *, usearch_index=None,
                 read_only: bool = False):
        from usearch.index import Index

        settings.validate()
        self.dim, self.settings, self.read_only = dim, settings, read_only
        self._index = usearch_index if usearch_index is not None else Index(
            ndim=dim, metric="cos", dtype=settings.dtype, connectivity=settings.connectivity,
            expansion_add=settings.expansion_add, expansion_search=settings.expansion_search,
        )
        self._matrix: tuple[np.ndarray, np.ndarray] | None = None  # (keys [n], unit vectors [n, D]) for exact search

    @classmethod
    def restore(cls, path: str, dim: int, settings: IndexSettings, *, view: bool = False) -> VectorIndex:
        """Open a saved index; view=True memory-maps it (read-only: updates raise)."""
        from usearch.index import Index

        index = Index(ndim=dim, metric="cos", dtype=settings.dtype, connectivity=settings.connectivity,
                      expansion_add=settings.expansion_add, expansion_search=settings.expansion_search)
        if view:
            index.view(path)
        else:
            index.load(path)
        index.expansion_search = settings.expansion_search
        return cls(dim, settings, usearch_index=index, read_only=view)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> np.ndarray:
        """Every key present, uint64 [n], ascending."""
        return np.sort(np.asarray(self._index.keys, dtype=np.uint64))

    def _check_writable(self) -> None:
        if self.read_only:
            raise PermissionError("this index is memory-mapped (loaded with view=True) and read-only; "
                                  "load it without view to add or remove")

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors [n, D] under new keys [n]."""
        self._check_writable()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise InputError(f"vectors have shape {vectors.shape}; this index holds {self.dim}-dimensional vectors")
        if len(keys):
            self._matrix = None
            self._index.add(np.asarray(keys, dtype=np.uint64), vectors)

    def remove(self, keys: np.ndarray) -> None:
        self._check_writable()
        if len(keys):
            self._matrix = None
            self._index.remove(np.asarray(keys, dtype=np.uint64))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """bool [n]: which keys are present."""
        if not len(keys):
            return np.zeros(0, bool)
        return np.asarray(self._index.contains(np.asarray(keys, dtype=np.uint64)), dtype=bool).reshape(-1)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """The stored vectors of present keys [n], as float32 [n, D] (f16/i8 as stored, not re-normalised)."""
        keys = np.asarray(keys, dtype=np.uint64)
        if not len(keys):
            return np.zeros((0, self.dim), np.float32)
        got = self._index.get(keys, dtype=np.float32)
        if isinstance(got, tuple):
            if any(v is None for v in got):
                raise KeyError(f"keys {[int(k) for k, v in zip(keys, got) if v is None][:5]} are not in the index")
            got = np.stack(got)
        return np.asarray(got, np.float32).reshape(len(keys), self.dim)

    def save(self, path: str) -> None:
        self._index.save(path)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys [n], unit float32 vectors [n, D]) of everything stored, as stored (rounded for f16/i8)."""
        matrix = self._matrix
        if matrix is None:
            keys = self.keys()
            vectors = self.get(keys)  # [n, D]
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            matrix = self._matrix = (keys, vectors)
        return matrix

    def search(self, queries: np.ndarray, k: int, *, exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The k best keys for each unit query vector.

        Args:
          queries: float32 [q, D] unit vectors.
          k: results per query.
          exact: brute-force NumPy search instead of the HNSW graph.
        Returns:
          keys uint64 [q, k] and scores float32 [q, k] (cosine similarity, best first); rows
          with fewer than k results are padded with key 2**64 - 1 and score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"queries have shape {queries.shape}; this index holds {self.dim}-dimensional vectors")
        q = len(queries)
        keys = np.full((q, k), np.iinfo(np.uint64).max, np.uint64)
        scores = np.full((q, k), -np.inf, np.float32)
        if not len(self) or not q or k < 1:
            return keys, scores
        if exact:
            stored_keys, vectors = self.vectors()
            similarity = queries @ vectors.T  # [q, n]
            n = min(k, len(stored_keys))
            if n < len(stored_keys):  # the n best unordered (linear time), then only they are sorted
                best = np.argpartition(-similarity, n - 1, axis=1)[:, :n]  # [q, n]
                order = np.argsort(-np.take_along_axis(similarity, best, axis=1), axis=1, kind="stable")
                top = np.take_along_axis(best, order, axis=1)  # [q, n]
            else:
                top = np.argsort(-similarity, axis=1, kind="stable")  # [q, n]
            keys[:, :n] = stored_keys[top]
            scores[:, :n] = np.take_along_axis(similarity, top, axis=1)
            return keys, scores
        matches = self._index.search(queries, min(k, len(self)))
        found_keys = np.asarray(matches.keys).reshape(q, -1)  # [q, k']
        distances = np.asarray(matches.distances, dtype=np.float32).reshape(q, -1)
        counts = np.asarray(matches.counts).reshape(q) if hasattr(matches, "counts") else np.full(q, found_keys.shape[1])
        found = np.arange(found_keys.shape[1])[None, :] < counts[:, None]  # [q, k']: real results, not padding
        width = found_keys.shape[1]
        keys[:, :width] = np.where(found, found_keys, keys[:, :width])
        scores[:, :width] = np.where(found, 1.0 - distances, -np.inf)
        return keys, scores
