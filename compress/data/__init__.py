"""Corpora and token windows: the bundled language reference with its train/held-out split,
text files, and windows of tokens. Calibration, evaluation, retrieval's bundled corpus and
the benchmarks all read text through here."""

from compress.data.corpus import (
    PYDOC_QUESTIONS,
    held_out_text,
    pydoc_split,
    pydoc_topics,
    random_windows,
    read_text_file,
    token_windows,
    train_text,
)

__all__ = ["PYDOC_QUESTIONS", "held_out_text", "pydoc_split", "pydoc_topics", "random_windows",
           "read_text_file", "token_windows", "train_text"]
