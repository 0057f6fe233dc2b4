"""`press batch`: a JSONL file of prompts through the engine into a JSONL file of results (resumable).

  press batch [configs/batch.yaml] --model M --input prompts.jsonl --output results.jsonl [key=value ...]
  press batch --model M --adapter NAME=DIR ... --input ...   # a line's "adapter": NAME runs that LoRA adapter
  press batch --model M --draft DRAFT [--draft-tokens K] --input ...   # speculative decoding with a draft model

What the files hold, how a job resumes and how it splits over devices and hosts: serve/batch.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os

from compress import config as cfg
from compress import distributed
from compress.errors import InputError
from compress.pretrained import ModelConfig
from serve.sampling import SamplingParams
from serve.speculative import MAX_DRAFT_TOKENS

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
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> PEFT LoRA directory (a line's "adapter")
    draft: str | None = None  # a draft model of the same tokenizer for speculative decoding (name, directory, .gguf;
    # "ngram": no model, proposals looked up in each request's own context)
    draft_tokens: int | None = None  # tokens the draft proposes per step (None: 3 for ngram on a CPU, else 4)
    draft_max_rows: int | None = None  # speculate only while at most this many rows are busy (None: 2 for ngram
    # on a CPU, else no limit)
    progress: bool = True  # a progress bar and a summary line on stderr
    max_line_bytes: int = 8 * 1024 * 1024  # a longer input line goes to the errors file, never read whole (serve.batch)
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host pods: one process per host)
    # With distributed, where JAX cannot detect the cluster (None: detected, or JAX_COORDINATOR_ADDRESS):
    coordinator_address: str | None = None  # host:port of process 0, the same on every process
    num_processes: int | None = None  # processes in the job
    process_id: int | None = None  # this process's index, 0 .. num_processes - 1

    def __post_init__(self):
        cfg.require_at_least(self, 1, "max_slots", "max_seq_len", "max_line_bytes")
        check_draft_fields(self)
        distributed.check_cluster_fields(self)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, BatchConfig)
    flags.flag("--model", key="model.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--input", key="input", help='JSONL: {"id", "prompt" | "messages", "sampling"?} per line')
    flags.flag("--output", key="output", help="JSONL results, appended; ids already there are skipped")
    flags.flag("--errors", key="errors", help="JSONL of the lines that could not run")
    add_engine_flags(flags, model="model", seed_help="sampling seed of every line (None: random per line)",
                     stop_help="strings that end the text")
    flags.flag("--no-progress", key="progress", action="store_false", help="no progress bar and no summary line")
    add_draft_flags(flags)
    add_adapter_flag(p)
    distributed.add_cluster_flags(flags)


def add_draft_flags(flags) -> None:
    """--draft MODEL --draft-tokens K: speculative decoding (press generate, batch and serve)."""
    flags.flag("--draft", key="draft", metavar="MODEL",
               help="a draft model with the target's tokenizer (a distilled student, a quantized copy): it proposes "
                    "tokens the model checks in one pass; bundled name, Hugging Face directory, .gguf or quantized "
                    "directory; or 'ngram': no model, each request's tokens looked up in its own prompt and output")
    flags.flag("--draft-tokens", key="draft_tokens", type=int, metavar="K", help="tokens the draft proposes per step")


def check_draft_fields(config) -> None:
    """For a config's __post_init__: ValueError unless draft_tokens is None or in [1, MAX_DRAFT_TOKENS] and
    draft, if set, is a non-empty name and comes without adapters."""
    if config.draft_tokens is not None and not 1 <= config.draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {config.draft_tokens}")
    if config.draft is not None and not config.draft:
        raise ValueError("draft is empty: name a draft model (or draft=null for none)")
    if config.draft is not None and getattr(config, "adapters", None):
        raise ValueError(f"adapters ({', '.join(config.adapters)}) cannot be served with a draft model "
                         f"({config.draft}); drop one of them")



def add_adapter_flag(p: argparse.ArgumentParser) -> None:
    """--adapter NAME=DIR, repeatable: a LoRA adapter served beside the base (see `with_adapter_flags`)."""
    p.add_argument("--adapter", dest="adapter_flags", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter (PEFT directory) served beside the base under NAME; repeatable")


def with_adapter_flags(config, args: argparse.Namespace):
    """`config` with the --adapter NAME=DIR flags added to its `adapters` mapping."""
    if not getattr(args, "adapter_flags", None):
        return config
    adapters = dict(config.adapters)
    for flag in args.adapter_flags:
        name, sep, directory = flag.partition("=")
        if not sep or not name or not directory:
            raise InputError(f"--adapter {flag!r}: expected NAME=DIR (the name a request gives to use it)")
        adapters[name] = directory
    return dataclasses.replace(config, adapters=adapters)


def add_engine_flags(flags, *, model: str, seed_help: str, stop_help: str) -> None:
    """The sampling and engine flags of an offline job (press batch, press synthesize); `model` is
    the config section of the model."""
    flags.flag("--max-new-tokens", key="sampling.max_new_tokens", type=int)
    flags.flag("--temperature", key="sampling.temperature", type=float, help="0 is greedy")
    flags.flag("--top-p", key="sampling.top_p", type=float)
    flags.flag("--top-k", key="sampling.top_k", type=int)
    flags.flag("--seed", key="sampling.seed", type=int, help=seed_help)
    flags.flag("--stop", key="sampling.stop", action="extend", nargs="+", metavar="STR", help=stop_help)
    flags.flag("--max-slots", key="max_slots", type=int, help="requests decoded together")
    flags.flag("--max-seq-len", key="max_seq_len", type=int, help="prompt + generated tokens per request")
    flags.flag("--dtype", key=f"{model}.dtype", help="weights and activations dtype")


def run(args: argparse.Namespace) -> int:
    """`press batch`; exit status 0 when every line is done, 1 when some are in the errors file."""
    config: BatchConfig = with_adapter_flags(cfg.config_from_args(args), args)
    return run_config(config)


def run_config(config: BatchConfig) -> int:
    import jax

    from serve.batch import default_errors_path, offline_engine, run_batch, sole_writer

    if not os.path.isfile(config.input):
        raise FileNotFoundError(f"{config.input}: no such input file")
    distributed.initialize(config)
    errors = config.errors or default_errors_path(config.output)
    index, count = jax.process_index(), jax.process_count()
    if count > 1:
        # First exchange now, while initialize() has the processes in step: opening the CPU
        # collectives gives up after 30 s, while the exchanges once open wait as long as a share takes.
        _check_same_job(config, errors)
    # One job per output, refused before the model loads (run_batch takes the lock again; a
    # multi-host job's processes each lock their part there, process 0 the output to merge).
    with sole_writer(config.output) if count == 1 else contextlib.nullcontext(), \
            offline_engine(config.model, config.max_slots, config.max_seq_len, multi_process=count > 1,
                           adapters=config.adapters or None, draft=config.draft,
                           draft_tokens=config.draft_tokens, draft_max_rows=config.draft_max_rows) as engine:
        if count == 1:
            summary = run_batch(engine, config.input, config.output, errors, config.sampling,
                                progress=config.progress, max_line_bytes=config.max_line_bytes)
        else:
            summary = _run_part(engine, config, errors, index, count)
        summary.update(engine.draft_stats())  # this process's engine: its rows, its acceptance
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


def _run_part(engine, config: BatchConfig, errors: str, index: int, count: int) -> dict:
    """Process `index` of a multi-host job: its share into its parts, then one merged OUTPUT.

    Every process reaches both exchanges (the barriers) even when its share or the merge
    failed, so none waits forever for another and every one learns of a failure anywhere;
    the parts are then kept (a rerun resumes from them) and every process fails.
    """
    from serve.batch import merge_parts, part_path, run_batch, total_summary

    failure = None
    try:
        report = run_batch(engine, config.input, part_path(config.output, index), part_path(errors, index),
                           config.sampling, progress=config.progress, shard=(index, count),
                           done_in=(config.output,), max_line_bytes=config.max_line_bytes)
    except Exception as e:  # noqa: BLE001 - re-raised below, after the exchanges
        failure, report = e, {"failed": f"process {index}: {type(e).__name__}: {e}"}
    reports = _allgather_json(report)  # every part is complete after this
    failed = [r["failed"] for r in reports if "failed" in r]
    merge = None
    if index == 0 and not failed:
        try:
            merge_parts(config.output, errors, count)
        except Exception as e:  # noqa: BLE001 - re-raised below, after the exchange
            failure, merge = e, {"failed": f"merging the parts: {type(e).__name__}: {e}",
                                 "input_error": isinstance(e, InputError)}
    merge = _allgather_json(merge)[0]  # process 0's; the job is over for all after this
    if failure is not None:
        raise failure
    if merge is not None:
        failed.append(merge["failed"])
    if failed:
        kind = InputError if merge is not None and merge["input_error"] else RuntimeError
        raise kind(f"press batch: {'; '.join(failed)}. The parts beside {config.output} are kept: rerun the "
                   "same command to resume")
    return total_summary(reports, config.output, errors)


def _check_same_job(config: BatchConfig, errors: str) -> None:
    """InputError on every process unless all write the same files with the same sampling defaults."""
    job = {"output": config.output, "errors": errors, "sampling": dataclasses.asdict(config.sampling)}
    jobs = _allgather_json(job)
    for i, other in enumerate(jobs):
        if other != jobs[0]:
            differ = sorted(k for k in job if other[k] != jobs[0][k])
            raise InputError(f"process {i} of the multi-host job has other {', '.join(differ)} than process 0 "
                             f"({other} against {jobs[0]}); start every process with the same command")


def _allgather_json(obj) -> list:
    """Every process's `obj` (JSON-serializable), in process order, on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))  # [processes, 1]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [json.loads(bytes(row[: int(n)])) for row, n in zip(np.asarray(gathered), np.asarray(sizes)[:, 0])]
