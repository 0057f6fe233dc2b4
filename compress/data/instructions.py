"""An instruction set written from the language reference: questions about its sections, and
the reference's own words as the answers (the built-in source "pydoc-qa").

Each topic of `pydoc_data.topics` is cut at its headings (a line underlined with *, = or -);
every section with a body becomes one prompt/response chat: the question asks about the
section's heading in one of a few fixed phrasings (chosen by the section's number, so the set
is the same on every machine), and the answer is the section's text up to `MAX_ANSWER`
characters, cut at a paragraph's end. The split is the reference's (compress/data/corpus.py):
sections of held-out topics are never in the train part, so a loss on the held-out part
measures what a tuned model learned about answering, not the answers themselves.
"""

from __future__ import annotations

from compress.data.corpus import is_held_out, pydoc_topics

PYDOC_QA_SOURCE = "pydoc-qa"
MAX_ANSWER = 1200  # characters of a section's text in its answer
PHRASINGS = (
    "What does the Python language reference say about {}?",
    "Explain {} in Python, as the language reference does.",
    "How does Python define {}? Answer from the language reference.",
    "Describe {} according to the Python language reference.",
)
_UNDERLINES = set("*=-")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every section of a topic's text (a heading is a line underlined with
    a line of *, = or - of its length); bodies are stripped and may be empty."""
    lines = text.split("\n")
    starts = [i - 1 for i in range(1, len(lines))
              if lines[i] and set(lines[i]) <= _UNDERLINES and len(lines[i]) == len(lines[i - 1]) and lines[i - 1].strip()]
    out = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        out.append((lines[start].strip(), "\n".join(lines[start + 2 : end]).strip()))
    return out


def answer(body: str, limit: int = MAX_ANSWER) -> str:
    """The body's first paragraphs that fit in `limit` characters (at least the first, cut)."""
    kept = ""
    for paragraph in body.split("\n\n"):
        candidate = f"{kept}\n\n{paragraph}" if kept else paragraph
        if len(candidate) > limit:
            return kept or paragraph[:limit]
        kept = candidate
    return kept


def pydoc_qa(held_out: bool = False) -> list[dict[str, str]]:
    """The prompt/response pairs of the train part (or, `held_out`, the held-out part), in the
    reference's sorted topic order; each with the "topic" it came from."""
    pairs = []
    number = 0
    for index, (name, text) in enumerate(sorted(pydoc_topics().items())):
        for heading, body in sections(text):
            if not body:
                continue
            number += 1
            if is_held_out(index) != held_out:
                continue
            pairs.append({"prompt": PHRASINGS[number % len(PHRASINGS)].format(heading),
                          "response": answer(body), "topic": name})
    return pairs
