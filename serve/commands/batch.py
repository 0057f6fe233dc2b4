"""`press batch`: a JSONL file of prompts through the engine into a JSONL file of results (resumable).

  press batch [configs/batch.yaml] --model M --input prompts.jsonl --output results.jsonl [key=value ...]

What the files hold, how a job resumes and how it splits over devices and hosts: serve/batch.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from compress import config as cfg
from compress.pretrained import ModelConfig
from serve.sampling import SamplingParams

HELP = "run a JSONL file of prompts offline (resumable)"


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """`press batch`: every line of `input` through the engine, results appended to `output`."""

    input: str  # JSONL: {"id", "prompt" | "messages", "sampling"?} per line
    output: str  # JSONL results, appended; ids already there are skipped
    model: ModelConfig = ModelConfig()
    errors: str | None = None  # JSONL of the lines that could not run; None: OUTPUT with .errors.jsonl
    sampling: SamplingParams = SamplingParams()  # every line's defaults; a line's "sampling" overrides them
    max_slots: int = 16  # requests decoded together
    max_seq_len: int = 1024  # prompt + generated tokens per request
    progress: bool = True  # a progress bar and a summary line on stderr
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host pods: one process per host)

    def __post_init__(self):
        cfg.require_at_least(self, 1, "max_slots", "max_seq_len")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, BatchConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--input", key="input", help='JSONL: {"id", "prompt" | "messages", "sampling"?} per line')
    flags.flag("--output", key="output", help="JSONL results, appended; ids already there are skipped")
    flags.flag("--errors", key="errors", help="JSONL of the lines that could not run")
    flags.flag("--max-new-tokens", key="sampling.max_new_tokens", type=int)
    flags.flag("--temperature", key="sampling.temperature", type=float, help="0 is greedy")
    flags.flag("--top-p", key="sampling.top_p", type=float)
    flags.flag("--top-k", key="sampling.top_k", type=int)
    flags.flag("--seed", key="sampling.seed", type=int, help="sampling seed of every line (None: random per line)")
    flags.flag("--stop", key="sampling.stop", action="extend", nargs="+", metavar="STR",
               help="strings that end the text")
    flags.flag("--max-slots", key="max_slots", type=int, help="requests decoded together")
    flags.flag("--max-seq-len", key="max_seq_len", type=int, help="prompt + generated tokens per request")
    flags.flag("--dtype", key="model.dtype", help="weights and activations dtype")
    flags.flag("--no-progress", key="progress", action="store_false", help="no progress bar and no summary line")
    flags.flag("--distributed", key="distributed", action="store_true",
               help="call jax.distributed.initialize() first (multi-host pods: one process per host)")


def run(args: argparse.Namespace) -> int:
    """`press batch`; exit status 0 when every line is done, 1 when some are in the errors file."""
    config: BatchConfig = cfg.config_from_args(args)
    return run_config(config)


def run_config(config: BatchConfig) -> int:
    import jax

    from compress import sharding as shd
    from serve.batch import run_batch
    from serve.engine import Engine

    if config.distributed:
        jax.distributed.initialize()
    if not os.path.isfile(config.input):
        raise FileNotFoundError(f"{config.input}: no such input file")
    output, errors, shard = config.output, config.errors, (0, 1)
    if jax.process_count() > 1:
        shard = (jax.process_index(), jax.process_count())
        output = f"{config.output}.part{shard[0]}"
        errors = errors and f"{errors}.part{shard[0]}"
    local = jax.local_devices()
    mesh, max_slots = None, config.max_slots
    if len(local) > 1:
        mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=local)
        max_slots = -(-max_slots // len(local)) * len(local)  # rows split evenly, else they are replicated
        if max_slots != config.max_slots:
            sys.stderr.write(f"press batch: max_slots {config.max_slots} rounded up to {max_slots}, "
                             f"a multiple of the {len(local)} devices\n")
    m = config.model
    engine = Engine.from_pretrained(m.name, dtype=m.dtype, param_dtype=m.param_dtype, mesh=mesh,
                                    max_slots=max_slots, max_seq_len=config.max_seq_len)
    with engine:
        summary = run_batch(engine, config.input, output, errors, config.sampling, progress=config.progress,
                            shard=shard)
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0
