"""Offline batch jobs: a JSONL file of prompts through the engine into a JSONL file of results.

  press batch [configs/batch.yaml] --model M --input prompts.jsonl --output results.jsonl [key=value ...]
  (the command: serve/commands/batch.py; the Python API: run_batch(engine, ...))

Input: one JSON object per line with an "id" (string or integer, unique in the file) and
either a "prompt" string or chat "messages" ([{"role", "content"}, ...]). An optional
"sampling" object overrides the command line's SamplingParams fields for that line
(max_new_tokens, temperature, top_k, top_p, seed, stop, stop_token_ids, ignore_eos), and an
optional "adapter" names one of the LoRA adapters the engine serves (--adapter NAME=DIR).

Output: one line per finished request, written whole and flushed as it finishes (completion
order, not input order):
  {"id", "text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
A killed job loses at most the requests in flight. Rerunning the same command resumes: ids
already in the output are skipped, after a torn last line (a run killed mid-write) is cut off.
One job writes an output at a time (an flock on it, compress/file_locks.py): a second job on
it, in another process or thread, is refused at once (InputError, exit status 2 from the
command, before the model loads); two at once had each written every result.

Errors: one line cannot stop the job or touch another line. A line that cannot run (longer
than max_line_bytes, 8 MiB by default, which is never read whole; bad JSON or UTF-8, no id, a
duplicate id, neither prompt nor messages, bad sampling values, a lone surrogate in any text,
too long for the context, the tokenizer or the engine failing on it, a result that cannot be
written) goes to the errors file as
{"line": N (1-based), "id": ... or null, "error": message} and the job goes on. Each run
rewrites that file, so it lists exactly the lines still not done; a rerun retries only them.
Every input line is accounted for in the summary:

  ok + skipped (already in the output) + errors + blank == lines

Every line written is valid UTF-8 JSON. An id holding a lone surrogate ("a\\ud800", valid JSON
but no Unicode text) is refused, and its errors line is written with ASCII escapes, so its id
reads exactly as the input line spelled it.

Requests are submitted in a window of 4 x max_slots, refilled as each one finishes, so the
engine always has work queued and a huge input is never all in memory.

Parallelism: when a host has more than one device, the engine's mesh puts its data axis over
all of them (`make_mesh(data=-1, fsdp=1, tensor=1)`), so the decode rows are split between
devices; --max-slots is rounded up to a multiple of the device count. On a multi-host pod,
start the same command on every host with --distributed (jax.distributed.initialize(); give
--coordinator-address, --num-processes and --process-id where JAX cannot detect the cluster):
process i of n takes the lines whose 1-based number satisfies number % n == i, serves them with
its local devices and appends to OUTPUT.part{i} (errors to ERRORS.part{i}), skipping ids already
in OUTPUT or in its part; it reads every line's id, so a duplicate is one across processes too.
When every process is done, process 0 appends the parts' new lines to OUTPUT, writes the merged
errors file (by line number) and removes the parts (merge_parts), so the job leaves one OUTPUT
as a single process would, its lines grouped by process. OUTPUT must be on a filesystem every
host sees. A job killed at any point, merge included, resumes by rerunning the same command.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from compress import file_locks
from compress.errors import InputError, check_json_unicode
from serve.sampling import SamplingParams

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
WINDOW_PER_SLOT = 4  # requests in flight per engine row
POLL_SECONDS = 0.02  # how long to wait on one request before checking the others
PROGRESS_SECONDS = 0.1  # least time between two progress bar updates
COUNTS = ("lines", "blank", "skipped", "ok", "errors", "requests", "generated_tokens")  # a summary's counts
FINISHED = ("stop", "length")  # finish reasons of a result; any other ('error', 'cancelled') is not done
MAX_LINE_BYTES = 8 * 1024 * 1024  # an input line beyond this is an error, never read whole (the server's body limit)
SKIP_BYTES = 1024 * 1024  # how much of a line beyond the limit is read at a time, to find its end


class LineError(ValueError):
    """An input line that cannot run; the message says what is wrong with it."""


# --- reading the input and the previous output


def bounded_lines(f, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """(1-based number, raw line, its bytes) for each line of the binary file `f`, holding no more
    than `limit` bytes of a line in memory: a longer line comes as (number, None, its bytes), read
    past a block at a time. A last line without its newline counts as a line."""
    for number in itertools.count(1):
        raw = f.readline(limit + 1)
        if not raw:
            return
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield number, raw, len(raw)
            continue
        size = len(raw)
        while not raw.endswith(b"\n"):
            raw = f.readline(SKIP_BYTES)
            if not raw:
                break
            size += len(raw)
        yield number, None, size


def parse_line(obj: Any) -> tuple[Any, Any, dict]:
    """(id, prompt or messages, sampling overrides) of one decoded input line, or LineError.

    Checks JSON types and that every text is valid Unicode (no lone surrogates); SamplingParams
    checks the values' ranges and the engine the prompt's length.
    """
    if not isinstance(obj, dict):
        raise LineError(f"expected a JSON object, got {type(obj).__name__}")
    line_id = parse_id(obj)
    check_text(line_id, "id")
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise LineError("needs exactly one of 'prompt' (a string) or 'messages' (a chat list)")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise LineError(f"'prompt' must be a non-empty string, got {prompt!r:.80}")
        check_text(prompt, "prompt")
    else:
        prompt = obj["messages"]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
            raise LineError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
        check_text(prompt, "messages")  # every field: a chat template may render more than content
    overrides = obj.get("sampling", {})
    if not isinstance(overrides, dict):
        raise LineError(f"'sampling' must be an object, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
    if unknown:
        raise LineError(f"unknown sampling field(s) {unknown}; valid: {list(SAMPLING_FIELDS)}")
    for name, value in overrides.items():
        _check_sampling_type(name, value)
    check_text(overrides.get("stop", ()), "sampling.stop")
    return line_id, prompt, overrides


def parse_id(obj: dict) -> Any:
    line_id = obj.get("id")
    if isinstance(line_id, bool) or not isinstance(line_id, (str, int)) or line_id == "":
        raise LineError(f"needs an 'id' that is a non-empty string or an integer, got {line_id!r:.80}")
    return line_id


def check_text(value: Any, where: str) -> None:
    """LineError if a string in the JSON value holds a lone surrogate.

    JSON may spell one ("\\ud800" unpaired) but no UTF-8 text can hold it: tokenizers reject
    it (a TypeError in Hugging Face's fast ones) and it cannot be written back out.
    """
    check_json_unicode(value, where, "a \\u escape of a surrogate must pair a high one with a low one; fix or drop it",
                       LineError, quote=True)


def _check_sampling_type(name: str, value: Any) -> None:
    """JSON types SamplingParams would coerce or let through (true as 1, "3" as a token id)."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = {
        "max_new_tokens": is_int,
        "top_k": is_int,
        "seed": value is None or is_int,
        "temperature": isinstance(value, (int, float)) and not isinstance(value, bool),
        "top_p": isinstance(value, (int, float)) and not isinstance(value, bool),
        "stop": isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value)),
        "stop_token_ids": isinstance(value, list)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value),
        "ignore_eos": isinstance(value, bool),
    }[name]
    if not ok:
        want = {"stop": "a string or a list of strings", "stop_token_ids": "a list of token ids (integers >= 0)",
                "ignore_eos": "true or false", "seed": "an integer or null"}
        kind = want.get(name, "an integer" if name in ("max_new_tokens", "top_k") else "a number")
        raise LineError(f"bad sampling: {name} must be {kind}, got {value!r:.80}")


def decode_line(raw: bytes) -> Any:
    """The JSON value of one input line, or LineError (not UTF-8, not JSON, nested too deep)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise LineError(f"not valid UTF-8: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a number of > 4300 digits, deep nesting
        raise LineError(f"not valid JSON: {e}") from None


def id_key(line_id: Any) -> str:
    """A hashable key that keeps 2 and "2" apart."""
    return json.dumps(line_id)


def read_done_ids(output_path: str, repair: bool = True) -> set[str]:
    """Keys (id_key) of the ids already in an output file.

    A run killed while writing leaves a last line without its newline: with `repair` the file
    is truncated to its last newline so appending starts on a fresh line (that request runs
    again); without it (another process's file) that line is only left out.
    """
    if not os.path.exists(output_path):
        return set()
    if repair:
        _cut_torn_last_line(output_path)
    done = set()
    with open(output_path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip() or not raw.endswith(b"\n"):
                continue
            try:
                done.add(id_key(json.loads(raw)["id"]))
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(
                    f"{output_path}:{number}: not a result line of press batch ({type(e).__name__}: {e}); "
                    "pass a new --output or fix that line"
                ) from None
    return done


def _cut_torn_last_line(path: str) -> None:
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        while end > 0:  # back to just after the last newline, a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        if end < f.seek(0, os.SEEK_END):
            f.truncate(end)


def offline_engine(model, max_slots: int, max_seq_len: int, *, multi_process: bool = False, name: str = "press batch",
                   adapters: dict[str, str] | None = None, draft: str | None = None, draft_tokens: int | None = None,
                   draft_max_rows: int | None = None):
    """The engine of an offline job (press batch, press synthesize) over this process's devices:
    with several, rows are decoded over all of them (max_slots rounded up to a multiple, said on
    stderr). `model` is a ModelConfig. With `multi_process`, a mesh is made even on one local
    device (the default device may be another host's). `draft` (a model name or path, or "ngram")
    decodes speculatively, draft_tokens a step, while at most draft_max_rows rows are busy."""
    import jax

    from compress import sharding as shd
    from serve.engine import Engine

    local = jax.local_devices()
    mesh, slots = None, max_slots
    if len(local) > 1 or multi_process:
        mesh = shd.make_mesh(data=-1, fsdp=1, tensor=1, devices=local)
        slots = -(-max_slots // len(local)) * len(local)  # rows split evenly, else they are replicated
        if slots != max_slots:
            sys.stderr.write(f"{name}: max_slots {max_slots} rounded up to {slots}, "
                             f"a multiple of the {len(local)} devices\n")
    return Engine.from_pretrained(model.name, dtype=model.dtype, param_dtype=model.param_dtype, mesh=mesh,
                                  max_slots=slots, max_seq_len=max_seq_len, adapters=adapters, draft=draft,
                                  draft_tokens=draft_tokens, draft_max_rows=draft_max_rows)


def default_errors_path(output_path: str) -> str:
    root = output_path[: -len(".jsonl")] if output_path.endswith(".jsonl") else output_path
    return root + ".errors.jsonl"


def part_path(path: str, index: int) -> str:
    """Where process `index` of a multi-host job writes its share of the file `path`."""
    return f"{path}.part{index}"


# --- writing


def result_json(record: dict) -> bytes:
    """One output line: UTF-8 JSON and its newline (UnicodeEncodeError for a lone surrogate)."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def error_json(number: int, line_id: Any, message: str) -> bytes:
    """One errors line; always valid UTF-8: a lone surrogate (in an id) is written as its \\u escape."""
    record = {"line": number, "id": line_id, "error": message}
    try:
        return result_json(record)
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


# --- the job


def run_batch(
    engine,
    input_path: str,
    output_path: str,
    errors_path: str | None = None,
    defaults: SamplingParams = SamplingParams(),
    progress: bool = True,
    *,
    window: int | None = None,
    shard: tuple[int, int] = (0, 1),
    done_in: Sequence[str] = (),
    result_line: Callable[[dict, Any], dict | None] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> dict:
    """Run the JSONL job `input_path` through `engine`, appending results to `output_path`.

    Args:
      engine: a serve.engine.Engine (its scheduler starts on the first submission).
      errors_path: JSONL of the lines that could not run (default: OUTPUT with .errors.jsonl);
        rewritten by every run.
      defaults: the sampling settings each line's "sampling" object overrides.
      progress: show a progress bar with live tokens/s on stderr, and a summary line at the end.
      window: requests in flight at once (default 4 x engine.max_slots).
      shard: (index, count): take only the lines whose 1-based number % count == index.
      done_in: more result files whose ids are done too, read but never written (a multi-host
        job's merged OUTPUT, while this process writes its part).
      result_line: what OUTPUT gets for a finished request: fn(the input line's JSON object, the
        engine's RequestOutput) -> the record to write as its line (it must keep the "id"), or
        None to write nothing (fn has kept the result elsewhere; it still counts as ok). A
        ValueError or TypeError it raises sends the line to the errors file. Default: the result
        line above (press batch's).
      max_line_bytes: a longer input line goes to the errors file without being read whole (a
        line of gigabytes would otherwise take the job's memory, and every rerun's).
    Returns:
      The summary: lines, blank, skipped, ok, errors (ok + skipped + errors + blank == lines),
      requests (sent to the engine), generated_tokens, wall_seconds, tokens_per_second,
      requests_per_second (finished ok per second), output, errors_file.
    """
    errors_path = errors_path or default_errors_path(output_path)
    for other, what in ((output_path, "--output"), (errors_path, "--errors")):
        if os.path.exists(other) and os.path.exists(input_path) and os.path.samefile(other, input_path):
            raise InputError(f"{what} {other} is the input file; pass another path")
    if os.path.abspath(errors_path) == os.path.abspath(output_path):
        raise InputError(f"the errors file and the output are the same file ({output_path})")
    with sole_writer(output_path):
        return _run_batch(engine, input_path, output_path, errors_path, defaults, progress, window, shard, done_in,
                          result_line, max_line_bytes)


def sole_writer(output_path: str):
    """Hold OUTPUT's writer lock (compress/file_locks.py) for a job, or InputError at once if another
    job holds it: two jobs on one output each skip only the ids already there when they start,
    so both wrote every result (and one could cut the other's line in writing as torn)."""
    return file_locks.exclusive(output_path, refuse=InputError(
        f"{output_path} is being written by another press batch job (or another process of this one); run one "
        "job per output: once that one ends, rerunning this command resumes where it stopped"))


def _run_batch(engine, input_path: str, output_path: str, errors_path: str, defaults: SamplingParams, progress: bool,
               window: int | None, shard: tuple[int, int], done_in: Sequence[str], result_line,
               max_line_bytes: int) -> dict:
    """run_batch's job, its output's writer lock held."""
    index, count = shard
    window = window or WINDOW_PER_SLOT * engine.max_slots
    if getattr(engine, "max_queued", None) is not None:  # never more in flight than the engine accepts
        window = min(window, engine.max_slots + engine.max_queued)
    done_before = read_done_ids(output_path)
    for path in done_in:
        done_before |= read_done_ids(path, repair=False)
    counts = dict.fromkeys(COUNTS, 0)
    first_line: dict[str, int] = {}  # id key -> the line that used it first
    in_flight: list[tuple[int, Any, dict, Any]] = []  # (line, id, input object, Request)
    bar = _Progress(input_path, shard, max_line_bytes) if progress else None
    start = time.perf_counter()

    # Binary files: every line is encoded whole before it is written, so a line that cannot be
    # encoded is never half written.
    with open(input_path, "rb") as lines, open(output_path, "ab") as out, open(errors_path, "wb") as errors:

        def error(number: int, message: str, line_id: Any = None) -> None:
            errors.write(error_json(number, line_id, message))
            errors.flush()
            counts["errors"] += 1

        def show(force: bool = False) -> None:
            if bar is not None:
                handled = counts["ok"] + counts["skipped"] + counts["errors"]
                live = counts["generated_tokens"] + sum(len(r.token_ids) for *_, r in in_flight)  # partial ones too
                bar.update(handled, live, time.perf_counter() - start, force)

        def collect(block: bool) -> None:
            """Write the finished requests; with block, first wait until at least one finishes."""
            while block and in_flight and not any(r.done for *_, r in in_flight):
                try:
                    in_flight[0][-1].result(timeout=POLL_SECONDS)
                except TimeoutError:
                    pass
                show()
            finished, running = [], []
            for item in in_flight:  # read `done` once per request: it may turn true meanwhile
                (finished if item[-1].done else running).append(item)
            in_flight[:] = running
            for number, line_id, obj, request in finished:
                result = request.result()
                if result.finish_reason not in FINISHED:
                    error(number, f"engine: {result.error or result.finish_reason}", line_id)
                    continue
                try:
                    record = _result_line(line_id, result) if result_line is None else result_line(obj, result)
                    line = None if record is None else result_json(record)
                except (ValueError, TypeError) as e:  # a lone surrogate in the text, a value JSON cannot hold
                    error(number, f"the result cannot be written as UTF-8 JSON: {type(e).__name__}: {e}", line_id)
                    continue
                if line is not None:
                    out.write(line)
                    out.flush()
                counts["ok"] += 1
                counts["generated_tokens"] += len(result.token_ids)
            show()

        try:
            for number, raw, size in bounded_lines(lines, max_line_bytes):
                if number % count != index:
                    if count > 1 and raw is not None:  # another process's line: its id makes a later one here a duplicate
                        _note_id(raw, number, first_line)
                    continue
                counts["lines"] += 1
                if raw is None:
                    error(number, f"the line is {size} bytes, beyond the limit of {max_line_bytes} (max_line_bytes); "
                                  "it was not read")
                    show()
                    continue
                if not raw.strip():
                    counts["blank"] += 1
                    continue
                line_id = None
                try:
                    obj = decode_line(raw)
                    if isinstance(obj, dict):
                        line_id = parse_id(obj)
                        check_text(line_id, "id")  # after line_id is set: the errors line names it
                        key = id_key(line_id)
                        if key in first_line:
                            raise LineError(f"duplicate id {line_id!r} (first on line {first_line[key]})")
                        first_line[key] = number
                        if key in done_before:
                            counts["skipped"] += 1
                            show()
                            continue
                    _, prompt, overrides = parse_line(obj)
                    try:
                        sampling = dataclasses.replace(defaults, **overrides)
                    except (TypeError, ValueError) as e:
                        raise LineError(f"bad sampling: {e}") from None
                    adapter = obj.get("adapter")
                    if adapter is not None and not isinstance(adapter, str):
                        raise LineError(f"'adapter' must be a string naming a served adapter, got {adapter!r:.80}")
                    check_text(adapter or "", "adapter")
                    chosen = {} if adapter is None else {"adapter": adapter}  # engines without adapters work too
                    request = engine.submit(prompt, sampling, request_id=str(line_id), **chosen)
                except ValueError as e:  # LineError, or the engine refusing the prompt (too long, ...)
                    error(number, str(e), line_id)
                    show()
                    continue
                except Exception as e:  # noqa: BLE001 - the tokenizer or engine failing on this line only
                    error(number, f"the engine cannot take this line: {type(e).__name__}: {e}", line_id)
                    show()
                    continue
                counts["requests"] += 1
                in_flight.append((number, line_id, obj, request))
                collect(block=len(in_flight) >= window)
            while in_flight:
                collect(block=True)
        finally:
            for *_, request in in_flight:  # interrupted: do not leave the engine working for nobody
                request.cancel()
            show(force=True)
            if bar is not None:
                bar.close()

    wall = time.perf_counter() - start
    if counts["ok"] + counts["skipped"] + counts["errors"] + counts["blank"] != counts["lines"]:
        raise RuntimeError(f"press batch lost track of some lines: {counts}")  # a bug, never the input's fault
    summary = summarize(counts, wall, output_path, errors_path)
    if progress:
        sys.stderr.write(summary_line(summary) + "\n")
    return summary


def _note_id(raw: bytes, number: int, first_line: dict[str, int]) -> None:
    """Record the line that used an id first, as run_batch does for its own lines (bad lines are not)."""
    try:
        obj = decode_line(raw)
        if isinstance(obj, dict):
            line_id = parse_id(obj)
            check_text(line_id, "id")
            first_line.setdefault(id_key(line_id), number)
    except ValueError:
        pass


def _result_line(line_id: Any, result) -> dict:
    return {
        "id": line_id,
        "text": result.text,
        "token_ids": result.token_ids,
        "prompt_tokens": len(result.prompt_token_ids),
        "completion_tokens": len(result.token_ids),
        "finish_reason": result.finish_reason,
    }


def summarize(counts: dict, wall: float, output_path: str, errors_path: str) -> dict:
    """The summary run_batch returns, from its counts and wall time."""
    return {
        **{name: counts[name] for name in COUNTS},
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(counts["generated_tokens"] / wall, 2) if wall > 0 else 0.0,
        "requests_per_second": round(counts["ok"] / wall, 3) if wall > 0 else 0.0,
        "output": output_path,
        "errors_file": errors_path,
    }


def summary_line(s: dict) -> str:
    errors = f"{s['errors']} errors (see {s['errors_file']})" if s["errors"] else "0 errors"
    return (
        f"{s['lines']} lines: {s['ok']} done, {s['skipped']} already done, {errors}, {s['blank']} blank; "
        f"{s['requests']} requests, {s['generated_tokens']} tokens in {s['wall_seconds']:.1f} s: "
        f"{s['tokens_per_second']:.1f} tokens/s, {s['requests_per_second']:.2f} requests/s"
    )


# --- multi-host jobs: one OUTPUT from the processes' parts


def merge_parts(output_path: str, errors_path: str, count: int) -> None:
    """Fold the parts of a `count`-process job into OUTPUT and ERRORS, then remove them.

    Run by one process once every process has finished its part. Each part's result lines
    whose id is not yet in OUTPUT are appended to it (after a torn last line is cut off) and
    synced to disk before any part is removed; the errors parts are merged by line number and
    replace ERRORS at once. A merge killed at any point is redone by the next one, which never
    writes an id twice.
    """
    outputs = [part_path(output_path, i) for i in range(count)]
    errors = [part_path(errors_path, i) for i in range(count)]
    missing = [p for p in outputs + errors if not os.path.exists(p)]
    if missing:
        raise InputError(f"{', '.join(missing)} missing: every process of a multi-host job writes its part beside "
                         f"{output_path}, which must be on a filesystem every host sees; the parts are kept, and "
                         "rerunning the job merges them")
    with sole_writer(output_path):
        _append_parts(output_path, outputs)
    lines = []
    for part in errors:
        with open(part, "rb") as f:
            lines += [raw for raw in f if raw.strip() and raw.endswith(b"\n")]  # a torn one's line is retried
    lines.sort(key=lambda raw: json.loads(raw)["line"])
    staged = errors_path + ".merging"
    with open(staged, "wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, errors_path)
    for part in errors + outputs:
        os.remove(part)


def _append_parts(output_path: str, outputs: Sequence[str]) -> None:
    """Append the parts' result lines whose id is not yet in OUTPUT to it, synced to disk."""
    done = read_done_ids(output_path)
    with open(output_path, "ab") as out:
        for part in outputs:
            with open(part, "rb") as f:
                for raw in f:
                    if not raw.strip() or not raw.endswith(b"\n"):  # a torn last line: that request runs again
                        continue
                    key = id_key(json.loads(raw)["id"])
                    if key not in done:
                        done.add(key)
                        out.write(raw)
        out.flush()
        os.fsync(out.fileno())


def total_summary(summaries: Sequence[dict], output_path: str, errors_path: str) -> dict:
    """One summary of a multi-host job from its processes' (they ran at once: the wall is the longest)."""
    counts = {name: sum(s[name] for s in summaries) for name in COUNTS}
    return {**summarize(counts, max(s["wall_seconds"] for s in summaries), output_path, errors_path),
            "processes": len(summaries)}


class _Progress:
    """A rich progress bar on stderr: lines handled of this shard's non-blank lines, live tokens/s."""

    def __init__(self, input_path: str, shard: tuple[int, int], max_line_bytes: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        index, count = shard
        with open(input_path, "rb") as f:
            total = sum(1 for number, raw, _ in bounded_lines(f, max_line_bytes)
                        if number % count == index and (raw is None or raw.strip()))
        self.progress = Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[rate]}"), console=Console(stderr=True),
        )
        self.task = self.progress.add_task("batch", total=total, rate="")
        self.last = 0.0
        self.progress.start()

    def update(self, handled: int, tokens: int, elapsed: float, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            rate = f"{tokens / elapsed:.1f} tokens/s" if elapsed > 0 else ""
            self.progress.update(self.task, completed=handled, rate=rate)

    def close(self) -> None:
        self.progress.stop()
