"""`press ask`: answer a question from a retrieval index, citing numbered sources (serve/rag.py).

  press ask [configs/ask.yaml] --index DIR --model M "question" [-k N] [--json] [key=value ...]

Prints the answer, then the sources it was given, numbered as cited ([1], [2], ...) with
their file, heading and character offsets; --json prints one JSON object (answer, found,
cited, sources). When nothing in the index is relevant (below min_score) it says so without
loading the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from compress import config as cfg
from compress.pretrained import ModelConfig
from serve.rag import DEFAULT_K, MIN_SCORE
from serve.sampling import SamplingParams

HELP = "answer a question from an index, citing numbered sources"


@dataclasses.dataclass(frozen=True)
class AskConfig:
    """`press ask`: one question, answered from `index` by `model`."""

    index: str  # the index directory (press index build)
    question: str
    model: ModelConfig = ModelConfig()  # a chat model
    k: int = DEFAULT_K  # sources retrieved
    min_score: float = MIN_SCORE  # hits below this cosine similarity are not relevant
    sampling: SamplingParams = SamplingParams(max_new_tokens=256)
    max_seq_len: int = 2048  # the model's context for prompt + answer

    def __post_init__(self):
        if not self.question.strip():
            raise ValueError("question is empty")
        cfg.require_at_least(self, 1, "k", "max_seq_len")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, AskConfig, positional="question")
    flags.flag("--index", key="index", metavar="DIR", help="the index directory")
    flags.flag("--model", key="model.name", help="chat model: bundled name, Hugging Face directory or .gguf")
    flags.flag("-k", key="k", type=int, help="sources retrieved")
    flags.flag("--max-new-tokens", key="sampling.max_new_tokens", type=int)
    flags.flag("--min-score", key="min_score", type=float, help="hits below this cosine similarity are not relevant")
    flags.flag("--temperature", key="sampling.temperature", type=float, help="0 is greedy")
    flags.flag("--seed", key="sampling.seed", type=int)
    flags.flag("--max-seq-len", key="max_seq_len", type=int, help="the model's context for prompt + answer")
    flags.flag("--dtype", key="model.dtype", help="weights and activations dtype")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace, out=None) -> int:
    return ask(cfg.config_from_args(args), as_json=args.json, out=out)


def ask(config: AskConfig, *, as_json: bool = False, out=None) -> int:
    from retrieval.retriever import Retriever
    from serve.engine import Engine
    from serve.rag import RagPipeline, unanswered

    out = out or sys.stdout
    retriever = Retriever.load(config.index)
    hits = retriever.search(config.question, config.k)
    if not any(h.score >= config.min_score for h in hits):  # said plainly, without loading the model
        answer = unanswered(config.question, hits[0].score if hits else None, config.min_score)
    else:
        m = config.model
        with Engine.from_pretrained(m.name, dtype=m.dtype, param_dtype=m.param_dtype, max_slots=1,
                                    max_seq_len=config.max_seq_len) as engine:
            pipeline = RagPipeline(retriever, engine, k=config.k, min_score=config.min_score)
            answer = pipeline.answer(config.question, sampling=config.sampling)
    if as_json:
        out.write(json.dumps(answer.to_json(), ensure_ascii=False) + "\n")
        return 0
    out.write(answer.text + "\n")
    if answer.sources:
        out.write("\nSources:\n")
        for s in answer.sources:
            mark = "cited" if s.number in answer.cited else "not cited"
            out.write(f"[{s.number}] {s.hit.location()} (score {s.hit.score:.2f}, {mark})\n")
    return 0
