"""`press serve`: an OpenAI-compatible HTTP server over the engine (serve/server.py), optionally
grounded in a retrieval index (serve/rag.py).

  press serve [configs/serve.yaml] --model M [--host 127.0.0.1] [--port 8000] [--index DIR] [key=value ...]
  press serve --model M --adapter NAME=DIR [--adapter NAME=DIR ...]   # LoRA adapters beside the base
  press serve --model M --draft DRAFT [--draft-tokens K]   # speculative decoding with a draft model

Each adapter (a PEFT directory: `press finetune` writes one in out/adapter) is served on the one
base model under its own name: it is listed in /v1/models and chosen by a request's `model`
field; requests for different adapters share a batch (the base weights read once per step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from compress import config as cfg
from serve.commands.batch import add_adapter_flag, add_draft_flags, check_draft_fields, with_adapter_flags
from compress.pretrained import ModelConfig

HELP = "serve a model over an OpenAI-compatible HTTP API"
API_KEY_VARIABLE = "PRESS_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`press serve`: which model, where to listen, and what to ground chat completions in."""

    model: ModelConfig = ModelConfig()
    host: str = "127.0.0.1"  # interface to listen on (default: loopback only)
    port: int = 8000
    api_key: str | None = None  # require 'Authorization: Bearer KEY'; None: $PRESS_API_KEY, else no key
    max_slots: int = 8  # requests decoded together (KV-cache rows)
    max_seq_len: int = 2048  # prompt + generated tokens per request
    max_queued: int | None = None  # requests waiting for a row before new ones get 429; None: 8 x max_slots
    max_prompts: int = 16  # prompts in one /v1/completions request
    drain_seconds: float = 30.0  # after SIGTERM, how long requests in flight may take to finish
    prefix_cache_blocks: int = 256  # prompt-prefix KV kept between requests, in blocks of 16 tokens (0: off)
    preempt: bool = True  # a request above its fair share of rows gives one up to a waiting one (then resumes)
    share_cap: bool = True  # while others hold or want rows, a request gets no row beyond its fair share
    prefill_delay: float = 1.0  # while decoding, new prompts wait this x the last prefill's time (batched prefills)
    chunked_prefill: bool = True  # short prompts arriving alone are written by the decode steps, a chunk a step
    compact_rows: bool = True  # busy rows move down into freed ones when a step can then compute fewer rows
    chunk_wait_steps: int = 0  # decode steps a short prompt may wait for a chunk turn before a batched prefill
    # (4 halved the prefill stalls beside hanging-up clients but cost a saturated load a sixth of its throughput)
    warmup: bool = False  # compile every batch/length shape before listening (cached for the next start)
    index: str | None = None  # ground chat completions in this retrieval index (press index build)
    rag_k: int = 4  # sources retrieved per chat request (with index)
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # model name -> PEFT LoRA directory
    draft: str | None = None  # a draft model of the same tokenizer for speculative decoding (name, directory, .gguf)
    draft_tokens: int | None = None  # tokens the draft proposes per step (None: 3 for ngram on a CPU, else 4)
    draft_max_rows: int | None = None  # speculate only while at most this many rows are busy (None: 2 for ngram
    # on a CPU, else no limit)

    def __post_init__(self):
        check_draft_fields(self)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        cfg.require_at_least(self, 1, "max_slots", "max_seq_len", "rag_k", "max_prompts")
        cfg.require_at_least(self, 0, "drain_seconds", "prefix_cache_blocks", "prefill_delay", *(["max_queued"] if self.max_queued is not None else []))

    @property
    def queue_limit(self) -> int:
        return 8 * self.max_slots if self.max_queued is None else self.max_queued


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, ServeConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--host", key="host", help="interface to listen on")
    flags.flag("--port", key="port", type=int)
    flags.flag("--api-key", key="api_key", help=f"require 'Authorization: Bearer KEY' (None: ${API_KEY_VARIABLE})")
    flags.flag("--max-slots", key="max_slots", type=int, help="requests decoded together (KV-cache rows)")
    flags.flag("--max-seq-len", key="max_seq_len", type=int, help="prompt + generated tokens per request")
    flags.flag("--dtype", key="model.dtype", help="weights and activations dtype")
    flags.flag("--warmup", key="warmup", action="store_true",
               help="compile every batch/length shape before listening (cached for the next start)")
    flags.flag("--max-queued", key="max_queued", type=int, help="waiting requests before new ones get 429")
    flags.flag("--drain-seconds", key="drain_seconds", type=float, help="after SIGTERM, time to finish requests")
    flags.flag("--index", key="index", metavar="DIR", help="ground chat completions in this retrieval index")
    flags.flag("--rag-k", key="rag_k", type=int, help="sources retrieved per chat request (with --index)")
    add_draft_flags(flags)
    add_adapter_flag(p)


def run(args: argparse.Namespace) -> int:
    return run_config(with_adapter_flags(cfg.config_from_args(args), args))


def make_engine(config: ServeConfig):
    """The engine `press serve` runs for `config` (not yet started)."""
    from serve.engine import Engine

    m = config.model
    return Engine.from_pretrained(m.name, dtype=m.dtype, param_dtype=m.param_dtype, max_slots=config.max_slots,
                                  max_seq_len=config.max_seq_len, max_queued=config.queue_limit,
                                  prefix_cache_blocks=config.prefix_cache_blocks, preempt=config.preempt,
                                  share_cap=config.share_cap,
                                  prefill_delay=config.prefill_delay, adapters=config.adapters or None,
                                  chunked_prefill=config.chunked_prefill, draft=config.draft,
                                  draft_tokens=config.draft_tokens, draft_max_rows=config.draft_max_rows,
                                  compact_rows=config.compact_rows,
                                  chunk_wait_steps=config.chunk_wait_steps)


def run_config(config: ServeConfig) -> int:
    from retrieval.retriever import Retriever
    from serve.rag import RagPipeline
    from serve.server import serve_forever

    retriever = Retriever.load(config.index) if config.index else None  # a bad index fails before the model loads
    engine = make_engine(config)
    rag = RagPipeline(retriever, engine, k=config.rag_k) if retriever is not None else None
    if config.warmup:
        start = time.perf_counter()
        programs = engine.warmup(prefix_lengths=engine.chat_prefix_lengths())
        sys.stderr.write(f"press serve: {programs} programs compiled or loaded in {time.perf_counter() - start:.1f} s\n")
    api_key = config.api_key if config.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    try:
        serve_forever(engine, config.host, config.port, api_key, rag=rag, max_prompts=config.max_prompts,
                      drain_seconds=config.drain_seconds)
    except OSError as e:  # the port is taken, the host is not ours, ...
        engine.close()
        sys.stderr.write(f"press serve: error: cannot listen on {config.host}:{config.port}: {e}\n")
        return 2
    return 0
