"""Retrieval quality on a question set: hit@k, the share of questions whose top k chunks
include one from an expected document.

A question set is JSON Lines, one object per question:

  {"question": "What does the nonlocal statement do?", "topics": ["nonlocal"], ...}

`topics` lists the document ids that answer it (compress/data/pydoc_questions.jsonl holds 62
questions about the CPython language reference, whose document ids are its topic names).
"""

from __future__ import annotations

import json
from typing import Sequence

from compress.errors import InputError
from retrieval.retriever import Retriever


def read_questions(path: str) -> list[dict]:
    """The questions of a JSONL question set; a bad line raises ValueError naming it."""
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path}:{number}: not valid JSON: {e}") from None
            if not isinstance(obj.get("question"), str) or not isinstance(obj.get("topics"), list) or not obj["topics"]:
                raise InputError(f"{path}:{number}: needs a 'question' string and a non-empty 'topics' list")
            questions.append(obj)
    return questions


def hit_rates(retriever: Retriever, questions: Sequence[dict], ks: Sequence[int] = (1, 5), *,
              exact: bool | None = None, hybrid: bool | None = None) -> dict:
    """{"hit@k": share of questions with an expected document among the top k chunks, ...,
    "misses": {k: [(question, top k doc ids), ...] for each k}}. exact, hybrid: the search modes."""
    top = max(ks)
    results = retriever.search_many([q["question"] for q in questions], top, exact=exact, hybrid=hybrid)
    out: dict = {}
    for k in ks:
        hits = [any(h.doc_id in q["topics"] for h in found[:k]) for q, found in zip(questions, results)]
        out[f"hit@{k}"] = sum(hits) / len(questions) if questions else float("nan")
        out.setdefault("misses", {})[k] = [(q["question"], [h.doc_id for h in found[:k]])
                                           for q, found, hit in zip(questions, results, hits) if not hit]
    return out
