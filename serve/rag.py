"""Retrieval-augmented answers: retrieve chunks, number them as sources, generate with the
serving engine, and return the answer with the sources it was given.

  pipeline = RagPipeline(Retriever.load("out/pydoc-index"), Engine.from_pretrained("smollm2-135m-instruct"))
  answer = pipeline.answer("What does the nonlocal statement do?", k=3)
  print(answer.text)
  for s in answer.sources:
      print(f"[{s.number}] {s.hit.location()}")

The prompt is a chat: a system message asking for an answer from the sources only, with
their numbers cited as [1], [2], ...; then one user message holding the numbered sources
(each headed by its location) and the question. Sources are dropped from the end (the
lowest ranked) until the prompt and `max_new_tokens` fit the engine's context.

Relevance: hits scoring below `min_score` (cosine similarity, default MIN_SCORE) are not
used. When none is left (an empty index, or nothing close to the question) the model is
not asked at all: the answer says plainly that the index holds nothing relevant, so it
never makes up an unsupported answer. MIN_SCORE = 0.3 is set for all-MiniLM-L6-v2: over the
language reference, the 62 questions of compress/data/pydoc_questions.jsonl score 0.48 or more
on their best chunk (median 0.71), while unrelated questions (a cake recipe, a football
final, a mountain's height, a bicycle tyre, a capital city) score 0.11-0.21. Another
encoder or corpus may want another threshold (`--min-score`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from compress.errors import InputError
from retrieval.retriever import Hit, Retriever
from serve.sampling import SamplingParams

MIN_SCORE = 0.3
DEFAULT_K = 4
SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources you are given. "
    "Cite the sources you use by their numbers in square brackets, like [1] or [2]. "
    "If the sources do not contain the answer, say that you do not know."
)
NOTHING_FOUND = "I found nothing relevant to this question in the index, so I cannot answer it from the sources."
EMPTY_INDEX = "The index is empty, so there are no sources to answer from."
_CITATION = re.compile(r"\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Source:
    """A retrieved chunk as numbered in the prompt."""

    number: int  # 1-based, as cited: [number]
    hit: Hit

    def to_json(self) -> dict:
        return {"number": self.number, "location": self.hit.location(), **self.hit.to_json()}


@dataclasses.dataclass(frozen=True)
class Grounding:
    """Chat messages with the sources put in, and those sources."""

    messages: list[dict]
    sources: tuple[Source, ...]
    found: bool  # False: nothing relevant was retrieved
    best_score: float | None  # the top hit's score, relevant or not; None for an empty index


@dataclasses.dataclass(frozen=True)
class Answer:
    question: str
    text: str
    sources: tuple[Source, ...]  # what the model was given, in prompt order
    cited: tuple[int, ...]  # source numbers the answer cites, in order of first citation
    found: bool  # False: nothing relevant; `text` says so and no model ran
    finish_reason: str  # the engine's, or 'no_sources'

    def to_json(self) -> dict:
        return {"question": self.question, "answer": self.text, "found": self.found,
                "finish_reason": self.finish_reason, "cited": list(self.cited),
                "sources": [s.to_json() | {"cited": s.number in self.cited} for s in self.sources]}


def citations(text: str, count: int) -> tuple[int, ...]:
    """Source numbers cited as [n] in `text` (1 <= n <= count), in order of first appearance."""
    out: list[int] = []
    for m in _CITATION.finditer(text):
        n = int(m.group(1))
        if 1 <= n <= count and n not in out:
            out.append(n)
    return tuple(out)


def unanswered(question: str, best_score: float | None, min_score: float) -> Answer:
    """The plain answer when retrieval found nothing relevant (best_score None: the index is empty)."""
    text = EMPTY_INDEX if best_score is None else (
        f"{NOTHING_FOUND} (The closest passage scores {best_score:.2f}, below the relevance threshold "
        f"{min_score:.2f}.)")
    return Answer(question, text, (), (), False, "no_sources")


def sources_block(sources: Sequence[Source]) -> str:
    """The numbered sources as the prompt shows them."""
    return "\n\n".join(f"[{s.number}] ({s.hit.source}{' > ' + s.hit.heading if s.hit.heading else ''})\n"
                       f"{s.hit.text.strip()}" for s in sources)


class RagPipeline:
    """Retrieve, prompt with numbered sources, generate. Thread-safe as its parts are.

    Args:
      retriever: a Retriever (retrieval/retriever.py).
      engine: a serve.engine.Engine of a chat model (one with a chat template).
      k: sources retrieved per question unless `answer` says otherwise.
      min_score: hits scoring below it are not used (see the module docstring).
      system_prompt: the system message.
    """

    def __init__(self, retriever: Retriever, engine: Any, *, k: int = DEFAULT_K, min_score: float = MIN_SCORE,
                 system_prompt: str = SYSTEM_PROMPT):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k={k!r}; it must be a positive integer")
        self.retriever, self.engine, self.k, self.min_score = retriever, engine, k, min_score
        self.system_prompt = system_prompt

    def retrieve(self, question: str, k: int | None = None) -> tuple[list[Hit], float | None]:
        """(the relevant hits, best first; the best score of all hits or None when the index is empty)."""
        hits = self.retriever.search(question, k or self.k)
        best = hits[0].score if hits else None
        return [h for h in hits if h.score >= self.min_score], best

    def ground(self, messages: Sequence[dict], *, k: int | None = None, max_new_tokens: int = 256) -> Grounding:
        """Put numbered sources for the last user message into a chat.

        The sources and the question go into that user message; a system message asking for
        cited answers comes first (an existing system message is kept after it). When nothing
        relevant is found the user message says so instead, and `found` is False.
        """
        messages = [dict(m) for m in messages]
        last = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "user"), None)
        if last is None or not isinstance(messages[last].get("content"), str):
            raise InputError("grounding needs a user message with text content to retrieve for")
        question = messages[last]["content"]
        # A question the context cannot hold is refused before the encoder tokenizes it whole (a
        # 7.8 MB one took 11.8 s there before the engine refused it).
        self.engine.check_length(len(question), "the question")
        hits, best = self.retrieve(question, k)
        sources = [Source(i + 1, h) for i, h in enumerate(hits)]
        system = [{"role": "system", "content": self.system_prompt}]
        if messages and messages[0].get("role") == "system":
            system[0]["content"] += "\n\n" + messages.pop(0)["content"]
            last -= 1
        while True:
            if sources:
                content = f"Sources:\n\n{sources_block(sources)}\n\nQuestion: {question}"
            else:
                content = (f"(No source in the index is relevant to this question.)\n\nQuestion: {question}")
            grounded = system + messages[:last] + [{"role": "user", "content": content}] + messages[last + 1 :]
            if not sources or self._fits(grounded, max_new_tokens):
                return Grounding(grounded, tuple(sources), bool(sources), best)
            if len(sources) == 1:  # one source alone is too long: keep as much of its text as fits
                sources = [self._shortened(sources[0], grounded, max_new_tokens)]
                continue
            sources = sources[:-1]

    def _fits(self, messages: list[dict], max_new_tokens: int) -> bool:
        return len(self.engine.encode(messages)) + max_new_tokens <= self.engine.max_seq_len

    def _shortened(self, source: Source, messages: list[dict], max_new_tokens: int) -> Source:
        over = len(self.engine.encode(messages)) + max_new_tokens - self.engine.max_seq_len
        text = source.hit.text
        keep = max(len(text) - 4 * over - 16, 0)  # a token is rarely shorter than 4 characters of prose
        if keep == 0:
            raise InputError(f"the engine's context of {self.engine.max_seq_len} tokens cannot hold the question "
                             f"and {max_new_tokens} new tokens; lower max_new_tokens or raise max_seq_len")
        return Source(source.number, dataclasses.replace(source.hit, text=text[:keep], end=source.hit.start + keep))

    def answer(self, question: str, *, k: int | None = None, sampling: Any = None) -> Answer:
        """Answer `question` from the index; see the module docstring.

        Args:
          k: sources to retrieve (default: the pipeline's k).
          sampling: serve.sampling.SamplingParams (default: greedy, 256 new tokens).
        """
        sampling = sampling or SamplingParams(max_new_tokens=256)
        grounding = self.ground([{"role": "user", "content": question}], k=k, max_new_tokens=sampling.max_new_tokens)
        if not grounding.found:
            return unanswered(question, grounding.best_score, self.min_score)
        out = self.engine.generate(grounding.messages, sampling)[0]
        if out.finish_reason == "error":
            raise InputError(f"generation failed: {out.error}")
        text = out.text.strip()
        return Answer(question, text, grounding.sources, citations(text, len(grounding.sources)), True,
                      out.finish_reason)
