"""Split documents into overlapping chunks of encoder tokens, keeping exact character offsets.

Each section under a heading (retrieval/headings.py) is cut separately, so no chunk spans
two sections. Within a section, windows of `chunk_tokens` tokens advance by
`chunk_tokens - overlap`; a window ends at the last word boundary (whitespace between two
tokens) in its second half when there is one, and the next starts at a word start, so
words are not cut into pieces. The last window of a section is a full one ending at the
section's end (overlapping its predecessor more) rather than a short remainder: a chunk
of a few tokens would be embedded as little more than its heading. A chunk's text is exactly `document.text[start:end]`.

What is embedded is the chunk's `context` (its heading path, else the document's title) on
one line, then its text without rule lines (heading underlines such as `*****`, table
borders such as `+-----+-----+`: the tokenizer would turn them into a token per character): a passage deep inside a long
section still carries the name of the topic it belongs to. Rule lines do not count
towards the window either. The context takes tokens from the window, so context plus chunk
always fit in the encoder (max_length - 2 tokens, leaving room for [CLS] and [SEP]).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from compress.errors import InputError
from retrieval.documents import Document
from retrieval.headings import sections

# A line of marks only: heading underlines, table borders (+----+----+), fences, rules.
RULE_LINE = re.compile(r"(?m)^[ \t]*[=\-~*^#+\"`_|:]{3,}[ \t]*(?:\r?\n|\r|$)")
LOOK_BACK = 8  # tokens a chunk may start early to begin at a word start
Spans = Callable[[str], list[tuple[int, int]]]  # text -> character (start, end) of each token


@dataclasses.dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut; recorded in the index so updates cut the same way.

    The default, 126 tokens + [CLS] + [SEP] = 128, is the input length all-MiniLM-L6-v2 was
    trained on and one of the encoder's length buckets (no padding up to 256).
    """

    chunk_tokens: int = 126  # tokens per chunk, context prefix included; at most the encoder's max_length - 2
    overlap: int = 24  # tokens shared by consecutive chunks of a section; < chunk_tokens / 2

    def validate(self, max_tokens: int | None = None) -> None:
        """Raise ValueError naming the bad setting; max_tokens is the encoder's limit (max_length - 2)."""
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 8:
            raise InputError(f"chunk_tokens={self.chunk_tokens!r}; it must be an integer >= 8")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.chunk_tokens // 2:
            raise InputError(f"overlap={self.overlap!r}; it must be an integer in [0, chunk_tokens/2) "
                             f"= [0, {self.chunk_tokens // 2})")
        if max_tokens is not None and self.chunk_tokens > max_tokens:
            raise InputError(f"chunk_tokens={self.chunk_tokens} exceeds what the encoder reads: {max_tokens} tokens "
                             "(its max_length minus [CLS] and [SEP]); pass a smaller --chunk-tokens")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of a document: text == document.text[start:end]."""

    doc_id: str
    ordinal: int  # position among its document's chunks, from 0
    text: str
    start: int  # character offsets into the document's text
    end: int
    source: str
    heading: str | None  # the heading path, ' > '-joined
    context: str  # prefixed to the text for embedding (heading path or title)
    metadata: dict[str, Any]

    @property
    def embed_text(self) -> str:
        """What the encoder reads for this chunk: its context, then its text without rule lines."""
        text = RULE_LINE.sub("", self.text)
        return f"{self.context}\n{text}" if self.context else text


def _word_start(spans: list[tuple[int, int]], i: int) -> bool:
    """Whether token i begins a word (whitespace, or nothing, before it)."""
    return i == 0 or spans[i][0] > spans[i - 1][1]


def _windows(spans: list[tuple[int, int]], size: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges [i, j) covering all tokens: at most `size` long, sharing at least `overlap`."""
    out, i, n = [], 0, len(spans)
    while i < n:
        j = min(i + size, n)
        if j < n:  # end at a word boundary in the second half of the window, if any
            j = next((b for b in range(j, i + size // 2, -1) if _word_start(spans, b)), j)
        out.append((i, j))
        if j == n:
            break
        nxt = max(j - overlap, i + 1)
        if n - nxt <= size:  # the rest fits in one window: a full one ending at n, starting at a word
            nxt = max(n - size, i + 1)
            i = next((b for b in range(nxt, min(nxt + LOOK_BACK, j + 1)) if _word_start(spans, b)), nxt)
        else:  # start at a word start, looking back at most LOOK_BACK tokens (more overlap, never less)
            i = next((b for b in range(nxt, max(nxt - LOOK_BACK, i), -1) if _word_start(spans, b)), nxt)
    return out


def chunk_document(doc: Document, spans: Spans, config: ChunkingConfig, max_tokens: int) -> list[Chunk]:
    """The chunks of one document, in text order.

    Args:
      doc: the document.
      spans: the encoder's tokenizer as text -> [(start, end)] of each token
        (`SentenceEncoder.token_spans`).
      config: chunk size and overlap; chunk_tokens <= max_tokens.
      max_tokens: what the encoder reads, [CLS] and [SEP] excluded (max_length - 2).
    """
    config.validate(max_tokens)
    chunks: list[Chunk] = []
    for section in sections(doc.text, doc.heading_style):
        body = doc.text[section.start : section.end]
        rules = [(m.start(), m.end()) for m in RULE_LINE.finditer(body)]
        token_spans = [(section.start + a, section.start + b) for a, b in spans(body)
                       if b > a and not any(r0 <= a < r1 for r0, r1 in rules)]
        if not token_spans:
            continue
        context = section.heading or doc.title or ""
        context_spans = spans(context) if context else []
        if len(context_spans) > config.chunk_tokens // 2:  # a very long heading: keep its first half-window
            context = context[: context_spans[config.chunk_tokens // 2 - 1][1]]
            context_spans = spans(context)
        size = config.chunk_tokens - len(context_spans) - (1 if context else 0)  # the newline may be a token
        overlap = min(config.overlap, size // 2 - 1) if size > 2 else 0
        for i, j in _windows(token_spans, max(size, 2), max(overlap, 0)):
            start, end = token_spans[i][0], token_spans[j - 1][1]
            chunks.append(Chunk(doc.doc_id, len(chunks), doc.text[start:end], start, end, doc.source,
                                section.heading, context, dict(doc.metadata)))
    return chunks
