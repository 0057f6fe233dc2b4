"""Corpora and token windows: the bundled language reference with its train/held-out split,
text files, and windows of tokens. Calibration, evaluation, retrieval's bundled corpus and
the benchmarks all read text through here.

The training data pipeline (Grain: sources, chat loss masks, packing, sharding, resumable
iterators) is `compress.data.pipeline` (DataConfig, train_batches), imported on its own so
that the commands that only read a corpus do not pay for importing Grain.
"""

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
