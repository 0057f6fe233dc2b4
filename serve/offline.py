"""Offline batch jobs: a JSONL file of prompts through the engine into a JSONL file of results.

  press batch --model M --input prompts.jsonl --output results.jsonl [--max-new-tokens N] [--temperature T] ...

Input: one JSON object per line with an "id" (string or integer, unique) and either a
"prompt" string or chat "messages"; an optional "sampling" object overrides the command
line's SamplingParams fields for that line. Blank lines are skipped (and counted).

Output: one line per finished request, written and flushed as it finishes (in completion
order): {"id", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}.
A killed job loses at most the requests in flight; rerunning the same command skips the ids
already in the output (a torn last line is cut off first). A malformed line goes to the
errors file ({"line", "id", "error"}) and the job goes on, so that

  ok + already done + errors + blank == lines in the input.

All local devices serve one engine: its decode rows are split over them (data parallel).
On a pod, start the same command on every host after `jax.distributed.initialize()`: host
i of n takes the lines with line_number % n == i and writes OUTPUT.part{i}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import deque
from typing import Any

from serve.sampling import SamplingParams

_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class LineError(ValueError):
    """A bad input line; the message says what is wrong with it."""


def done_ids(output_path: str) -> set:
    """Ids already in the output; a torn last line (a killed run) is cut off first."""
    if not os.path.exists(output_path):
        return set()
    with open(output_path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            f.truncate(end)
    ids = set()
    for number, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                ids.add(_id_key(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{output_path}:{number}: not a result line of press batch ({e}); "
                                 "pass a new --output or fix the file") from e
    return ids


def _id_key(value: Any) -> str:
    return json.dumps(value)


def parse_line(text: str, defaults: SamplingParams) -> tuple[Any, Any, SamplingParams]:
    """(id, prompt or messages, sampling) of one input line, or LineError."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise LineError("needs an 'id' that is a string or an integer")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise LineError("needs exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if has_prompt and (not isinstance(obj["prompt"], str) or not obj["prompt"]):
        raise LineError("'prompt' must be a non-empty string")
    if has_messages and (not isinstance(obj["messages"], list) or not obj["messages"]):
        raise LineError("'messages' must be a non-empty list of {role, content} objects")
    overrides = obj.get("sampling", {})
    if not isinstance(overrides, dict):
        raise LineError("'sampling' must be an object")
    unknown = sorted(set(overrides) - _SAMPLING_FIELDS)
    if unknown:
        raise LineError(f"unknown sampling field(s) {unknown}; valid: {sorted(_SAMPLING_FIELDS)}")
    try:
        sampling = dataclasses.replace(defaults, **overrides)
    except (TypeError, ValueError) as e:
        raise LineError(f"bad sampling: {e}") from None
    return obj["id"], obj["prompt"] if has_prompt else obj["messages"], sampling


def run_batch(
    engine,
    input_path: str,
    output_path: str,
    errors_path: str | None = None,
    defaults: SamplingParams = SamplingParams(),
    *,
    progress: bool = True,
    window: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Run a batch job with an engine; returns the summary (also printed when progress is on).

    window: requests in flight at once (default 4 x the engine's rows), so a huge input is
    never all in memory. shard: (index, count) of this host's share of the lines.
    """
    errors_path = errors_path or _errors_path(output_path)
    finished = done_ids(output_path)
    window = window or 4 * engine.max_slots
    counts = {"lines": 0, "blank": 0, "skipped": 0, "ok": 0, "errors": 0, "generated_tokens": 0}
    seen: set = set()
    in_flight: deque = deque()
    start = time.perf_counter()
    bar = _Progress(progress, input_path)

    with open(input_path, encoding="utf-8") as lines, open(output_path, "a", encoding="utf-8") as out, \
            open(errors_path, "a", encoding="utf-8") as errors:

        def error(number: int, message: str, line_id: Any = None) -> None:
            errors.write(json.dumps({"line": number, "id": line_id, "error": message}, ensure_ascii=False) + "\n")
            errors.flush()
            counts["errors"] += 1

        def drain(block: bool) -> None:
            while in_flight and (block or in_flight[0][2].done):
                number, line_id, request = in_flight.popleft()
                result = request.result()
                if result.finish_reason == "error":
                    error(number, result.error, line_id)
                    continue
                out.write(json.dumps({
                    "id": line_id,
                    "text": result.text,
                    "token_ids": result.token_ids,
                    "prompt_tokens": len(result.prompt_token_ids),
                    "completion_tokens": len(result.token_ids),
                    "finish_reason": result.finish_reason,
                }, ensure_ascii=False) + "\n")
                out.flush()
                counts["ok"] += 1
                counts["generated_tokens"] += len(result.token_ids)
                bar.update(counts, time.perf_counter() - start)

        for number, text in enumerate(lines, 1):
            if number % shard[1] != shard[0]:
                continue
            counts["lines"] += 1
            if not text.strip():
                counts["blank"] += 1
                continue
            line_id = None
            try:
                line_id, prompt, sampling = parse_line(text, defaults)
                key = _id_key(line_id)
                if key in seen:
                    raise LineError(f"duplicate id {line_id!r} (first seen earlier in this file)")
                seen.add(key)
                if key in finished:
                    counts["skipped"] += 1
                    continue
                request = engine.submit(prompt, sampling, request_id=str(line_id))
            except ValueError as e:  # LineError, or the engine refusing the prompt (too long, ...)
                error(number, str(e), line_id)
                continue
            in_flight.append((number, line_id, request))
            drain(block=len(in_flight) >= window)
        drain(block=True)

    wall = time.perf_counter() - start
    bar.close()
    summary = {
        **counts,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(counts["generated_tokens"] / wall, 2) if wall > 0 else 0.0,
        "requests_per_second": round(counts["ok"] / wall, 3) if wall > 0 else 0.0,
        "output": output_path,
        "errors_file": errors_path,
    }
    assert counts["ok"] + counts["skipped"] + counts["errors"] + counts["blank"] == counts["lines"]
    return summary


def _errors_path(output_path: str) -> str:
    root = output_path[: -len(".jsonl")] if output_path.endswith(".jsonl") else output_path
    return root + ".errors.jsonl"


class _Progress:
    """A rich progress bar on stderr with live tokens/s, or nothing."""

    def __init__(self, enabled: bool, input_path: str):
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with open(input_path, "rb") as f:
            total = sum(1 for line in f if line.strip())
        self.progress = Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"), console=_stderr_console(), transient=False,
        )
        self.task = self.progress.add_task("batch", total=total, rate="")
        self.progress.start()

    def update(self, counts: dict, elapsed: float) -> None:
        if self.progress is not None:
            rate = f"{counts['generated_tokens'] / elapsed:.1f} tok/s" if elapsed > 0 else ""
            done = counts["ok"] + counts["skipped"] + counts["errors"]
            self.progress.update(self.task, completed=done, rate=rate)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("batch", help="run a JSONL file of prompts offline (resumable)")
    p.add_argument("--model", required=True, help="bundled name, Hugging Face directory or .gguf file")
    p.add_argument("--input", required=True, help="JSONL: {id, prompt | messages, sampling?} per line")
    p.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    p.add_argument("--errors", help="JSONL of bad lines (default: OUTPUT with .errors.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="a string that ends the text (repeatable)")
    p.add_argument("--max-slots", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-seq-len", type=int, default=1024, help="prompt + generated tokens per request")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    import jax

    from compress import sharding as shd
    from serve.engine import Engine

    defaults = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop),
    )
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"{args.input}: no such input file")
    output, shard = args.output, (0, 1)
    if jax.process_count() > 1:
        shard = (jax.process_index(), jax.process_count())
        output = f"{args.output}.part{jax.process_index()}"
    local = jax.local_devices()
    mesh = shd.make_mesh(data=len(local), fsdp=1, tensor=1, devices=local) if len(local) > 1 else None
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, mesh=mesh, max_slots=args.max_slots,
                                    max_seq_len=args.max_seq_len)
    with engine:
        summary = run_batch(engine, args.input, output, args.errors, defaults, progress=not args.no_progress, shard=shard)
    sys.stderr.write(
        f"{summary['ok']} done, {summary['skipped']} already done, {summary['errors']} errors "
        f"(see {summary['errors_file']}), {summary['blank']} blank; {summary['generated_tokens']} tokens in "
        f"{summary['wall_seconds']:.1f} s: {summary['tokens_per_second']:.1f} tokens/s, "
        f"{summary['requests_per_second']:.2f} requests/s\n"
    )
    print(json.dumps(summary))
    return 0
