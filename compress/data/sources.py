"""Documents to train on, from text files, JSONL files and the built-in corpora, read and checked.

A source is the name of a built-in corpus or a path:

  "pydoc"     the train part of the CPython language reference, one document per topic
              (compress/data/corpus.py decides the split; held-out topics are never read here)
  "stdlib"    the standard library's docstrings, one document per module (docstrings.py)
  "pydoc-qa"  questions about the language reference's sections answered in its own words,
              as chats trained on the answers (instructions.py; the same train/held-out split)
  x.jsonl     one document per non-blank line, a JSON object with either
                "text": a string, or
                "messages": a chat, a list of {"role": str, "content": str, ...} with at least
                one "assistant" turn (rendered by the tokenizer's chat template; only the
                assistant turns are trained on), or
                "prompt" and "response" strings (and an optional "system"): the chat of one
                user turn and its answer, trained on the answer only
  a directory every .jsonl, .txt, .md and .rst file under it, in sorted order (hidden ones skipped)
  other file  UTF-8 text, one document per file. A file is kept whole rather than split at
              blank lines: packing splits long documents across rows anyway, and a whole file
              keeps its paragraphs in one context.

Built-in names win over paths: write ./pydoc for a file named pydoc. Every file is read and
checked when the pipeline is built, so bad input fails before training starts, with an
InputError naming the file and line (bad JSON, a missing key, a wrong type, a lone surrogate
that no tokenizer can encode). Blank documents are skipped. With an errors file
(`read_sources(..., errors=PATH)`, DataConfig.errors) a bad JSONL line is not fatal: it is
written there, with its file:line, the problem and the line itself, and reading goes on, so
nothing is dropped without a record.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence, Union

from compress.data.corpus import is_held_out, pydoc_topics, read_text_file
from compress.data.docstrings import STDLIB_SOURCE, ModuleDocstrings, stdlib_modules
from compress.data.instructions import PYDOC_QA_SOURCE, pydoc_qa
from compress.errors import InputError, check_unicode

PYDOC_SOURCE = "pydoc"
BUILTIN_SOURCES = (PYDOC_SOURCE, STDLIB_SOURCE, PYDOC_QA_SOURCE)
TEXT_SUFFIXES = (".txt", ".md", ".rst")  # files a directory source reads as text (besides .jsonl)


@dataclasses.dataclass(frozen=True)
class TextDocument:
    text: str
    where: str  # for error messages: "path", "path:line" or "pydoc_data.topics['name']"


@dataclasses.dataclass(frozen=True)
class ChatDocument:
    messages: tuple[dict[str, Any], ...]  # each with "role" and "content" strings
    where: str  # "path:line"


Document = Union[TextDocument, ChatDocument, ModuleDocstrings]


def read_sources(sources: Sequence[str], errors: str | None = None, *, held_out: bool = False) -> list[Document]:
    """The documents of every source, in the order given (see the module docstring).

    errors: a path; bad JSONL lines are recorded there (one JSON object each: "where",
    "error", "line") instead of stopping at the first. The file is written (replaced) even
    when there are none, so it always describes the last read.
    held_out: read the held-out part of the built-in corpora that have one (pydoc, pydoc-qa)
    instead of their train part: for evaluation only. Files are read as they are.
    """
    bad: list[dict[str, str]] | None = None if errors is None else []
    documents: list[Document] = []
    for source in sources:
        documents.extend(read_source(source, bad, held_out=held_out))
    if errors is not None:
        _write_errors(errors, bad)
    return documents


def _write_errors(path: str, bad: list[dict[str, str]]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in bad:
            f.write(json.dumps(record, ensure_ascii=True) + "\n")
    os.replace(tmp, path)


def read_source(source: str, bad: list[dict[str, str]] | None = None, *, held_out: bool = False) -> list[Document]:
    """The documents of one source: a built-in corpus's name, a file or a directory."""
    if source == PYDOC_SOURCE:
        return [
            TextDocument(text, f"pydoc_data.topics[{name!r}]")
            for i, (name, text) in enumerate(pydoc_topics().items())
            if is_held_out(i) == held_out and text.strip()
        ]
    if source == PYDOC_QA_SOURCE:
        return [ChatDocument(_prompt_response(pair, f"{PYDOC_QA_SOURCE}[{n}] ({pair['topic']})"), f"{PYDOC_QA_SOURCE}[{n}]")
                for n, pair in enumerate(pydoc_qa(held_out))]
    if held_out and source == STDLIB_SOURCE:
        raise InputError(f"{STDLIB_SOURCE} has no held-out part; evaluate on a file, {PYDOC_SOURCE} or {PYDOC_QA_SOURCE}")
    if source == STDLIB_SOURCE:
        return list(stdlib_modules())
    if os.path.isdir(source):
        return [doc for path in _files_under(source) for doc in read_file(path, bad)]
    if not os.path.exists(source):
        raise InputError(
            f"{source}: no such file or directory; a data source is a text or .jsonl file, a directory "
            f"of them, or one of the built-in corpora: {', '.join(BUILTIN_SOURCES)}"
        )
    return read_file(source, bad)


def read_file(path: str, bad: list[dict[str, str]] | None = None) -> list[Document]:
    """A .jsonl file's documents (one per non-blank line), or a text file as one document."""
    if path.endswith(".jsonl"):
        return read_jsonl(path, bad)
    text = read_text_file(path)
    return [TextDocument(text, path)] if text.strip() else []


def read_jsonl(path: str, bad: list[dict[str, str]] | None = None) -> list[Document]:
    """One document per non-blank line of a JSONL file. A bad line fails naming the file and
    line, or, given a `bad` list, is appended to it ({"where", "error", "line"}) and skipped."""
    documents: list[Document] = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                document = _line_document(raw, number, where)
            except InputError as e:
                if bad is None:
                    raise
                bad.append({"where": where, "error": str(e), "line": raw.decode("utf-8", "replace").rstrip("\r\n")})
                continue
            if document is not None:
                documents.append(document)
    return documents


def _line_document(raw: bytes, number: int, where: str) -> Document | None:
    try:
        line = raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start} of the line); convert the file to UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"
        ) from None
    return _document(record, where)


def _document(record: Any, where: str) -> Document | None:
    """The document a JSONL line holds (None for blank text), or an InputError saying what is wrong."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object with a 'text' string or a 'messages' list, got {_json_type(record)}")
    if "messages" in record:
        return ChatDocument(_messages(record["messages"], where), where)
    if "prompt" in record or "response" in record:
        return ChatDocument(_prompt_response(record, where), where)
    if "text" not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        raise InputError(f"{where}: no 'text', 'messages' or 'prompt'/'response' key (keys: {keys}); give a 'text' "
                         "string, a 'messages' list, or 'prompt' and 'response' strings")
    text = _string(record["text"], where, "'text'")
    return TextDocument(text, where) if text.strip() else None


def _prompt_response(record: dict[str, Any], where: str) -> tuple[dict[str, Any], ...]:
    """The chat of a {"prompt", "response"[, "system"]} line: one user turn and its answer."""
    for key in ("prompt", "response"):
        if key not in record:
            raise InputError(f"{where}: a 'prompt' needs a 'response' and a 'response' a 'prompt' (no {key!r})")
    messages = [{"role": "user", "content": _string(record["prompt"], where, "'prompt'")},
                {"role": "assistant", "content": _string(record["response"], where, "'response'")}]
    if "system" in record:
        messages.insert(0, {"role": "system", "content": _string(record["system"], where, "'system'")})
    return tuple(messages)


def _messages(messages: Any, where: str) -> tuple[dict[str, Any], ...]:
    """The checked messages of a chat: a non-empty list of {"role": str, "content": str} with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        raise InputError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got {got}")
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{where}: {field} must be an object with 'role' and 'content' strings, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise InputError(f"{where}: {field} has no {key!r}; every message needs 'role' and 'content' strings")
            _string(message[key], where, f"{field}.{key}")
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: the chat has no 'assistant' message, so nothing in it would be trained on")
    return tuple(messages)


def _string(value: Any, where: str, field: str) -> str:
    """`value` if it is a string every tokenizer can encode; an InputError naming `field` otherwise."""
    if not isinstance(value, str):
        raise InputError(f"{where}: {field} must be a string, got {_json_type(value)}")
    check_unicode(value, f"{where}: {field}", "a \\u escape of a surrogate must pair a high one with a low one; "
                  "fix the escapes in that line")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type ("a number", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _files_under(directory: str) -> list[str]:
    """The .jsonl and text files under `directory`, sorted, hidden files and directories skipped."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        paths.extend(
            os.path.join(dirpath, name)
            for name in sorted(filenames)
            if not name.startswith(".") and name.endswith((".jsonl", *TEXT_SUFFIXES))
        )
    return paths
