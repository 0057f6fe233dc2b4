"""Retrieval: find the passages of the user's documents that answer a question.

  from retrieval import Retriever, SentenceEncoder, read_documents

Grounded answers (retrieval plus generation) are served from serve/rag.py.
"""

# Embedding
from retrieval.encoder import SentenceEncoder

# Documents and chunks
from retrieval.chunking import Chunk, ChunkingConfig
from retrieval.documents import PYDOC_TOPICS, Document, pydoc_documents, read_documents

# The index
from retrieval.retriever import AddReport, EncoderMismatchError, Hit, Retriever
from retrieval.store import IndexChangedError, IndexFileError
from retrieval.vector_index import IndexSettings

__all__ = [
    "SentenceEncoder",
    "Chunk", "ChunkingConfig", "PYDOC_TOPICS", "Document", "pydoc_documents", "read_documents",
    "AddReport", "EncoderMismatchError", "Hit", "Retriever", "IndexChangedError", "IndexFileError",
    "IndexSettings",
]
