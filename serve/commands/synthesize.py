"""`press synthesize`: a teacher answers prompts, and its answers become chat training data (resumable).

  press synthesize [configs/synthesize.yaml] --teacher M --prompts FILE --out data.jsonl [key=value ...]
  press train ... data.sources=[data.jsonl]      # the student learns the teacher's answers

Sequence-level distillation: the student is trained on whole answers its teacher wrote, rather
than on the teacher's logits. The answers come from the serving engine through press batch's
runner (serve/batch.py), so the job has its window of requests in flight, per-line errors,
progress bar and resumption.

Prompts (FILE): a .jsonl file holds one JSON object per line with either a "prompt" string (a
user message) or chat "messages" (the teacher answers the last turn, which must not be the
assistant's), an optional "id" (a string or an integer, unique; default: the line's number)
and an optional "sampling" object overriding `sampling` for that line, as in press batch. Any
other file is UTF-8 text with one prompt per line, whose id is its line number. Blank lines
are skipped. Give ids to prompts in a file that may still change: an inserted line renumbers
the ones after it. `system`, when set, comes first in every prompt without a system message
of its own.

Output (OUT): one training example per answer, appended as it finishes, in the chat format the
data pipeline reads (compress/data/sources.py; only assistant turns are trained on, those of a
chat prompt included):
  {"id", "messages": [...the prompt's messages, {"role": "assistant", "content": answer}],
   "teacher": the teacher's name, "finish_reason": "stop" or "length"}
With samples_per_prompt n > 1 each prompt gets n answers, with ids "<id>/0" ... "<id>/<n-1>"
and a "sample" field (0 .. n-1). Every answer has its own seed, answer_seed(sampling seed,
prompt id, sample): reproducible, the same whatever else is in the file or the batch, and
independent between prompts (one seed shared by every prompt would draw the same random numbers
for all of them). With seed null the engine draws a random one per answer.

Default sampling, for data rather than for evaluation: temperature 0.7 and top_p 0.95 (a small
teacher decoded greedily falls into loops, and n > 1 answers need sampling to differ; greedy
with n > 1 is refused, as its answers would be copies), seed 0 (a rerun writes the same data),
max_new_tokens 512 (whole answers to ordinary questions; max_seq_len 1024 leaves as much for
the prompt).

Truncated answers (finish_reason "length": cut at max_new_tokens) are kept out of OUT by
default (keep_truncated: false). The pipeline renders every assistant message with the chat
template, which closes it with the end-of-turn token ("<|im_end|>" for SmolLM2), and that
token is trained on: a cut answer would teach the student to end its turn mid-sentence. They
go to the TRUNCATED file instead (OUT with .truncated.jsonl), as the same training lines:
inspect them, raise max_new_tokens and delete that file to answer them again, or train on them
anyway with data.sources=[OUT, TRUNCATED]. keep_truncated: true writes them to OUT.

Resuming: rerunning the same command after a kill -9, a Ctrl-C or a crash continues the job.
An answer is done when its id is in OUT (or, without keep_truncated, in TRUNCATED); done ones
are skipped, and each finished answer is written whole, once, to one of the two files, so no
line is lost or duplicated (a torn last line of a killed run is cut off and that answer runs
again). Switching keep_truncated on answers the truncated ids again into OUT.

Errors: a prompt line that cannot run (bad JSON or UTF-8, a bad or duplicate id, neither prompt
nor messages, a last turn that is the assistant's, bad sampling, a lone surrogate in any text,
too long for the context, the engine failing on it) goes to the errors file (OUT with
.errors.jsonl) as {"line": N (1-based, in FILE), "id": the answer's id or null, "error"} and the
job goes on. Each run rewrites that file, so it lists exactly the prompts and answers still not
done; a rerun retries only them.

Point data.sources at OUT itself, not at its directory: the errors and truncated files sit
beside it. While it runs, the job keeps two hidden files beside OUT (the prompts as press batch
requests, and press batch's errors); a run removes them when it ends, a killed one's next run.
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Iterator

from compress import config as cfg
from compress.errors import InputError
from compress.pretrained import ModelConfig
from serve import batch
from serve.sampling import SamplingParams
from serve.commands.batch import add_engine_flags

HELP = "a teacher answers prompts: chat training data (resumable)"

# For data: varied, reproducible, whole answers (see the module docstring).
DATA_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.95, seed=0)


@dataclasses.dataclass(frozen=True)
class SynthesizeConfig:
    """`press synthesize`: the teacher answers every prompt of `prompts`; training examples appended to `out`."""

    prompts: str  # .jsonl: {"prompt" | "messages", "id"?, "sampling"?} per line; other files: one prompt per line
    out: str  # JSONL training examples (chat), appended; ids already there are skipped
    teacher: ModelConfig = ModelConfig()
    sampling: SamplingParams = DATA_SAMPLING  # every answer's; a line's "sampling" overrides them
    samples_per_prompt: int = 1  # answers per prompt, each with its own seed; ids "<id>/<k>" when > 1
    system: str | None = None  # a system message for the prompts without one; None: none added
    keep_truncated: bool = False  # write answers cut at max_new_tokens to OUT; false: to TRUNCATED
    errors: str | None = None  # JSONL of the prompts that could not run; None: OUT with .errors.jsonl
    truncated: str | None = None  # JSONL of the truncated answers; None: OUT with .truncated.jsonl
    max_slots: int = 16  # requests decoded together
    max_seq_len: int = 1024  # prompt + generated tokens per request
    progress: bool = True  # a progress bar and summary lines on stderr

    def __post_init__(self):
        cfg.require_at_least(self, 1, "samples_per_prompt", "max_slots", "max_seq_len")
        if self.samples_per_prompt > 1 and self.sampling.greedy:
            raise ValueError(f"samples_per_prompt {self.samples_per_prompt} with temperature 0 (greedy) gives copies "
                             "of one answer; set sampling.temperature above 0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags = cfg.add_config_arguments(p, SynthesizeConfig)
    flags.flag("--teacher", key="teacher.name", help="bundled name, Hugging Face directory or .gguf file")
    flags.flag("--prompts", key="prompts", help='.jsonl: {"prompt" | "messages", "id"?} per line; '
                                                "other files: one prompt per line")
    flags.flag("--out", key="out", help="JSONL training examples, appended; ids already there are skipped")
    flags.flag("--errors", key="errors", help="JSONL of the prompts that could not run")
    flags.flag("--samples-per-prompt", key="samples_per_prompt", type=int, help="answers per prompt")
    flags.flag("--system", key="system", help="a system message for the prompts without one")
    flags.flag("--keep-truncated", key="keep_truncated", action="store_true",
               help="write answers cut at max_new_tokens to OUT too")
    add_engine_flags(flags, model="teacher", seed_help="of the answers' seeds (None: random per answer)",
                     stop_help="strings that end an answer")
    flags.flag("--no-progress", key="progress", action="store_false", help="no progress bar and no summary lines")


def run(args: argparse.Namespace) -> int:
    """`press synthesize`; exit status 0 when every answer is done, 1 when some are in the errors file."""
    config: SynthesizeConfig = cfg.config_from_args(args)
    return run_config(config)


def run_config(config: SynthesizeConfig) -> int:
    from serve.batch import offline_engine

    if not os.path.isfile(config.prompts):
        raise FileNotFoundError(f"{config.prompts}: no such prompts file")
    engine = offline_engine(config.teacher, config.max_slots, config.max_seq_len, name="press synthesize")
    with engine:
        summary = synthesize(engine, config)
    print(json.dumps(summary))
    return 1 if summary["errors"] else 0


def synthesize(engine, config: SynthesizeConfig) -> dict:
    """Answer `config.prompts` with `engine` (the teacher), appending training examples to `config.out`.

    Returns the summary: prompts (non-blank lines), blank, bad_prompts (lines that could not be
    read), answers (asked for: samples_per_prompt per good prompt), ok (written to OUT by this run),
    truncated (written to TRUNCATED), skipped (done before), failed, with
    ok + truncated + skipped + failed == answers; errors (bad_prompts + failed: the errors file's
    lines), requests, generated_tokens, wall_seconds, tokens_per_second, teacher, output,
    errors_file, truncated_file (None with keep_truncated).
    """
    out = config.out
    errors_path = config.errors or batch.default_errors_path(out)
    truncated_path = None if config.keep_truncated else config.truncated or _default_truncated_path(out)
    _check_paths(config.prompts, out=out, errors=errors_path, truncated=truncated_path)
    if not getattr(engine.tokenizer, "chat_template", None):
        raise InputError(f"the teacher {config.teacher.name} has no chat template, and its answers become chats; "
                         "use an instruct (chat) model as the teacher")
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    hidden = os.path.join(directory, "." + os.path.basename(out))
    requests_path, batch_errors_path = hidden + ".synthesize-requests", hidden + ".synthesize-errors"
    done_in = ()
    if truncated_path is not None:
        batch.read_done_ids(truncated_path)  # cuts a killed run's torn last line, before this run appends
        done_in = (truncated_path,)
    kept_apart = 0  # answers this run wrote to TRUNCATED

    def training_line(request: dict, result) -> dict | None:
        """The answer as a training example: OUT's line, or None once it is in TRUNCATED."""
        nonlocal kept_apart
        record = answer_line(request, result.text, config.teacher.name, result.finish_reason)
        if result.finish_reason != "length" or truncated_path is None:
            return record
        line = batch.result_json(record)  # before the file is touched: a line that cannot be written is an error
        truncated_file.write(line)
        truncated_file.flush()
        kept_apart += 1
        return None

    bad: list[tuple[int, Any, str]] = []  # the prompt lines that cannot run: (line, id or None, message)
    origin = None
    _remove(requests_path, batch_errors_path)  # a killed run's: its errors are not this run's
    try:
        origin, counts = write_requests(config, requests_path, bad)
        with open(truncated_path, "ab") if truncated_path else contextlib.nullcontext() as truncated_file:
            summary = batch.run_batch(engine, requests_path, out, batch_errors_path, config.sampling,
                                      progress=config.progress, done_in=done_in, result_line=training_line)
    finally:
        if origin is not None:  # also when interrupted: the errors so far, as press batch leaves them
            _write_errors(errors_path, bad, batch_errors_path, origin)
        _remove(requests_path, batch_errors_path)

    failed = summary["errors"]
    result = {
        "prompts": counts["prompts"], "blank": counts["blank"], "bad_prompts": len(bad), "answers": summary["lines"],
        "ok": summary["ok"] - kept_apart, "truncated": kept_apart, "skipped": summary["skipped"],
        "failed": failed, "errors": len(bad) + failed, "requests": summary["requests"],
        "generated_tokens": summary["generated_tokens"], "wall_seconds": summary["wall_seconds"],
        "tokens_per_second": summary["tokens_per_second"], "teacher": config.teacher.name,
        "output": out, "errors_file": errors_path, "truncated_file": truncated_path,
    }
    if config.progress:
        sys.stderr.write(summary_line(result) + "\n")
    return result


def summary_line(s: dict) -> str:
    kept_out = f", {s['truncated']} truncated (in {s['truncated_file']})" if s["truncated_file"] else ""
    errors = f"{s['errors']} errors (see {s['errors_file']})" if s["errors"] else "0 errors"
    return (f"press synthesize: {s['prompts']} prompts, {s['answers']} answers: {s['ok']} written to {s['output']}"
            f"{kept_out}, {s['skipped']} already done; {errors}")


# --- the prompts as press batch requests


def write_requests(config: SynthesizeConfig, requests_path: str, bad: list) -> tuple[array.array, dict[str, int]]:
    """Write every answer the prompts ask for as one press batch input line of `requests_path`.

    The lines are {"id": the answer's id, "messages", "sampling": the line's overrides and the
    answer's seed, "sample"?}. The prompt lines that cannot run are appended to `bad` as
    (line, id or None, message). Returns (the prompts file's line of every request line,
    {"prompts", "blank"}).
    """
    n = config.samples_per_prompt
    origin = array.array("q")  # request line - 1 -> prompts file line
    counts = {"prompts": 0, "blank": 0}
    first_line: dict[str, int] = {}  # an answer id key -> the prompt line that asked for it first
    with open(requests_path, "wb") as requests:
        for number, prompt in read_prompts(config.prompts):
            if prompt is None:
                counts["blank"] += 1
                continue
            counts["prompts"] += 1
            line_id = None
            try:
                if isinstance(prompt, dict):  # its id first, so that an errors line names it
                    line_id = batch.parse_id(prompt)
                    batch.check_text(line_id, "id")
                line_id, messages, overrides = _parse_prompt(prompt, config.system)
                key = batch.id_key(answer_id(line_id, 0, n))
                if key in first_line:  # one id key for all samples: k differs only where the prompt ids do
                    raise batch.LineError(f"duplicate id {line_id!r} (first on line {first_line[key]})")
                first_line[key] = number
                try:
                    sampling = dataclasses.replace(config.sampling, **overrides)
                except (TypeError, ValueError) as e:
                    raise batch.LineError(f"bad sampling: {e}") from None
                if n > 1 and sampling.greedy:
                    raise batch.LineError(f"temperature 0 (greedy) gives {n} copies of one answer")
            except ValueError as e:
                bad.append((number, line_id, str(e)))
                continue
            for k in range(n):
                seed = None if sampling.seed is None else answer_seed(sampling.seed, line_id, k)
                request = {"id": answer_id(line_id, k, n), "messages": messages,
                           "sampling": {**overrides, "seed": seed}}
                if n > 1:
                    request["sample"] = k
                requests.write(batch.result_json(request))
                origin.append(number)
    return origin, counts


def read_prompts(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, what the line holds) of a prompts file, one pair a line.

    What a line holds: None when it is blank; a LineError when it cannot be read; else its JSON
    value (a .jsonl file's) or {"prompt": its text} (another file's), with "id": the line's
    number added to an object that has none.
    """
    jsonl = path.endswith(".jsonl")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                yield number, None
                continue
            try:
                if jsonl:
                    value = batch.decode_line(raw)
                else:
                    try:
                        text = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
                    except UnicodeDecodeError as e:
                        raise batch.LineError(f"not valid UTF-8: {e}") from None
                    if not text:  # a byte order mark alone
                        yield number, None
                        continue
                    value = {"prompt": text}
            except batch.LineError as e:
                yield number, e
                continue
            yield number, {"id": number, **value} if isinstance(value, dict) and "id" not in value else value


def _parse_prompt(prompt: Any, system: str | None) -> tuple[Any, list[dict], dict]:
    """(id, messages, sampling overrides) of what read_prompts gave for a line, or LineError."""
    if isinstance(prompt, batch.LineError):
        raise prompt
    line_id, body, overrides = batch.parse_line(prompt)
    if isinstance(body, str):
        messages = [{"role": "user", "content": body}]
    else:
        for i, m in enumerate(body):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise batch.LineError(f"messages[{i}] needs string 'role' and 'content' fields, got {m!r:.80}")
        if body[-1]["role"] == "assistant":
            raise batch.LineError("the last message is the assistant's: there is nothing for the teacher to answer")
        messages = list(body)
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    return line_id, messages, overrides


def answer_id(prompt_id: Any, sample: int, samples_per_prompt: int) -> Any:
    """The id of a prompt's answer in OUT: the prompt's own with one sample, else "<id>/<sample>"."""
    return prompt_id if samples_per_prompt == 1 else f"{prompt_id}/{sample}"


def answer_seed(seed: int, prompt_id: Any, sample: int) -> int:
    """The sampling seed of one answer: a hash of (seed, prompt id, sample), in [0, 2**32)."""
    key = json.dumps([seed, prompt_id, sample], ensure_ascii=False).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def answer_line(request: dict, answer: str, teacher: str, finish_reason: str) -> dict:
    """One training example: the request's chat with the teacher's answer as the assistant's turn."""
    record = {"id": request["id"], "messages": [*request["messages"], {"role": "assistant", "content": answer}],
              "teacher": teacher, "finish_reason": finish_reason}
    if "sample" in request:
        record["sample"] = request["sample"]
    return record


# --- files


def _default_truncated_path(output_path: str) -> str:
    root = output_path[: -len(".jsonl")] if output_path.endswith(".jsonl") else output_path
    return root + ".truncated.jsonl"


def _check_paths(prompts: str, **paths: str | None) -> None:
    """InputError unless the prompts, OUT, errors and TRUNCATED files are four different files."""
    named = [(name, path) for name, path in paths.items() if path is not None]
    for name, path in named:
        if os.path.exists(path) and os.path.samefile(path, prompts):
            raise InputError(f"the {name} file {path} is the prompts file; pass another path")
    for i, (name, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if os.path.abspath(path) == os.path.abspath(other_path):
                raise InputError(f"the {name} and {other} files are the same file ({path}); pass different paths")


def _remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _write_errors(errors_path: str, bad: list, batch_errors_path: str, origin: array.array) -> None:
    """The errors file: the prompt lines that could not be read and the answers press batch could not
    write, by line of the prompts file (press batch's request lines mapped back through `origin`)."""
    entries = [(number, line_id, message) for number, line_id, message in bad]
    if os.path.exists(batch_errors_path):
        with open(batch_errors_path, "rb") as f:
            for raw in f:
                if raw.strip() and raw.endswith(b"\n"):
                    e = json.loads(raw)
                    entries.append((origin[e["line"] - 1], e["id"], e["error"]))
    entries.sort(key=lambda entry: entry[0])  # stable: a prompt's samples stay in order
    with open(errors_path, "wb") as f:
        for number, line_id, message in entries:
            f.write(batch.error_json(number, line_id, message))
