"""Retrieval: find the passages of the user's documents that answer a question.

  from retrieval import Retriever, RagPipeline, SentenceEncoder, read_documents
"""

# Embedding
from retrieval.encoder import SentenceEncoder

# Documents and chunks
from retrieval.chunking import Chunk, ChunkingConfig
from retrieval.documents import PYDOC_TOPICS, Document, pydoc_documents, read_documents

# The index
from retrieval.retriever import AddReport, EncoderMismatchError, Hit, Retriever
from retrieval.store import IndexFileError
from retrieval.vector_index import IndexSettings

# Grounded answers
from retrieval.rag import MIN_SCORE, Answer, RagPipeline, Source

__all__ = [
    "SentenceEncoder",
    "Chunk", "ChunkingConfig", "PYDOC_TOPICS", "Document", "pydoc_documents", "read_documents",
    "AddReport", "EncoderMismatchError", "Hit", "Retriever", "IndexFileError", "IndexSettings",
    "MIN_SCORE", "Answer", "RagPipeline", "Source",
]
