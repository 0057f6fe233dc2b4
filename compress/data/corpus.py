"""Text to train, calibrate and evaluate on: the bundled language reference, text files, token windows.

The one place press reads corpora from. Calibration (GPTQ, SmoothQuant), evaluation, the
retrieval index of the language reference and the benchmarks all come here, so the split
between what may be trained on and what is held out is decided once.

The language reference. CPython ships its language reference as `pydoc_data.topics`
(79 topics). Topics are taken in sorted order and every fifth (the 0th, 5th, ...) is held
out: `pydoc_split()` gives (train, held_out). Anything that trains or calibrates a model on
this text must use the train part only, so that perplexity measured on the held-out part
stays a held-out figure.

Token windows. `token_windows` cuts a token sequence into consecutive, non-overlapping
windows of `window` tokens; the tail that does not fill one is dropped.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from compress.errors import InputError

PYDOC_HELD_OUT_SOURCE = "pydoc_data.topics (held-out part: every fifth topic, sorted)"
PYDOC_TRAIN_SOURCE = "pydoc_data.topics (train part: all but every fifth topic, sorted)"
HELD_OUT_EVERY = 5  # every fifth topic (in sorted order) is held out
# 62 questions about the language reference, each with the topics that answer it (retrieval quality).
PYDOC_QUESTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pydoc_questions.jsonl")


def pydoc_topics() -> dict[str, str]:
    """{topic name: text} of the CPython language reference in `pydoc_data.topics`, in sorted order."""
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def is_held_out(index: int) -> bool:
    """Whether the topic at `index` (in sorted order) belongs to the held-out part."""
    return index % HELD_OUT_EVERY == 0


def pydoc_split() -> tuple[str, str]:
    """(train_text, held_out_text) of the language reference; topics joined by blank lines.

    Trainers and calibration must use train_text only.
    """
    texts = list(pydoc_topics().values())
    held_out = [t for i, t in enumerate(texts) if is_held_out(i)]
    train = [t for i, t in enumerate(texts) if not is_held_out(i)]
    return "\n\n".join(train), "\n\n".join(held_out)


def read_text_file(path: str) -> str:
    """The text of a UTF-8 file; a missing file or other bytes fail naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text file (a UTF-8 text file is expected)")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def held_out_text(path: str | None = None) -> tuple[str, str]:
    """(text, source) to evaluate on: a UTF-8 text file, or the held-out part of the language reference."""
    if path is None:
        return pydoc_split()[1], PYDOC_HELD_OUT_SOURCE
    return read_text_file(path), path


def train_text(path: str | None = None) -> tuple[str, str]:
    """(text, source) to train or calibrate on: a UTF-8 text file, or the train part of the language reference."""
    if path is None:
        return pydoc_split()[0], PYDOC_TRAIN_SOURCE
    return read_text_file(path), path


def token_windows(ids: Sequence[int], window: int, max_windows: int, source: str) -> np.ndarray:
    """The first `max_windows` consecutive windows of `window` ids: [N, window] int32.

    Raises ValueError naming `source` and the token count when not even one window fits.
    """
    count = min(len(ids) // window, max_windows)
    if count == 0:
        raise InputError(
            f"{source}: the text is {len(ids)} tokens, fewer than one window of {window}; "
            f"give a longer text or a smaller window"
        )
    return np.asarray(ids[: count * window], np.int32).reshape(count, window)


def random_windows(ids: Sequence[int], window: int, count: int, seed: int, source: str) -> np.ndarray:
    """`count` windows of `window` ids at random offsets (seeded; they may overlap): [count, window] int32."""
    ids = np.asarray(ids, np.int32)
    if len(ids) < window:
        raise InputError(f"{source}: the text is {len(ids)} tokens, fewer than one window of {window}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - window + 1, size=count)
    return np.stack([ids[s : s + window] for s in starts])
