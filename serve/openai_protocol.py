"""The OpenAI request and response shapes: validate a JSON body into engine prompts and SamplingParams.

Used by serve/server.py; no HTTP here. A bad field raises `ApiError` naming it, which the
server sends as an OpenAI error object. Fields OpenAI defines but this server does not
implement are accepted at their default values (n=1, echo=false, logprobs=null, penalties 0,
...) and rejected otherwise, so a client never silently gets something it did not ask for.
A field OpenAI does not define is rejected, as OpenAI does; `top_k`, `ignore_eos` and
`stop_token_ids` are extensions (as in vLLM).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from serve.sampling import MAX_STOP_TOKEN_IDS, SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ParsedRequest:
    """A validated request: prompts for `engine.encode`, and what the response needs."""

    prompts: list[Any]  # text, token ids, or chat messages; one per choice
    max_tokens: int | None  # None: the rest of the context (chat's default)
    sampling: dict  # SamplingParams fields except max_new_tokens
    stream: bool
    include_usage: bool
    prompt_param: str  # the field a prompt error names: "prompt" or "messages"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(param: str, what: str, value) -> ApiError:
    return ApiError(400, f"{param} must be {what}, got {value!r}", param=param, code="invalid_value")


def _unsupported(param: str, value, allowed: str) -> ApiError:
    return ApiError(400, f"{param}={value!r} is not supported by this server (only {allowed})", param=param,
                    code="unsupported_value")


# Fields OpenAI defines that this server does not implement: name -> (is the value the default?, allowed).
_AT_DEFAULT = {
    "n": (lambda v: v is None or v == 1 and _is_int(v), "1"),
    "echo": (lambda v: v is None or v is False, "false"),
    "best_of": (lambda v: v is None or v == 1 and _is_int(v), "1"),
    "suffix": (lambda v: v is None or v == "", "null"),
    "presence_penalty": (lambda v: v is None or _is_number(v) and v == 0, "0"),
    "frequency_penalty": (lambda v: v is None or _is_number(v) and v == 0, "0"),
    "logit_bias": (lambda v: v is None or v == {}, "null"),
    "top_logprobs": (lambda v: v is None or v == 0 and _is_int(v), "null"),
    "tools": (lambda v: v is None or v == [], "null: no tool calling"),
    "functions": (lambda v: v is None or v == [], "null: no function calling"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), '"none"'),
    "function_call": (lambda v: v in (None, "none", "auto"), '"none"'),
    "response_format": (lambda v: v is None or v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v is None or v == ["text"], '["text"]'),
    "audio": (lambda v: v is None, "null"),
    "prediction": (lambda v: v is None, "null"),
}
# Fields OpenAI defines that do not change the generated text: accepted and ignored, whatever their value.
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "reasoning_effort",
            "safety_identifier", "prompt_cache_key", "verbosity", "web_search_options"}
_SAMPLING = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options",
             "top_k", "ignore_eos", "stop_token_ids"}
COMPLETION_FIELDS = _SAMPLING | {"prompt", "n", "echo", "logprobs", "best_of", "suffix", "presence_penalty",
                                 "frequency_penalty", "logit_bias", "user"}
CHAT_FIELDS = _SAMPLING | {"messages", "max_completion_tokens", "logprobs"} | set(_AT_DEFAULT) | _IGNORED
CHAT_FIELDS -= {"echo", "best_of", "suffix"}
_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _check_fields(body: dict, known: set[str], logprobs_default) -> None:
    for name in body:
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", param=name,
                           code="unknown_parameter")
    for name, (at_default, allowed) in _AT_DEFAULT.items():
        if name in known and not at_default(body.get(name)):
            raise _unsupported(name, body[name], allowed)
    if body.get("logprobs") not in (None, logprobs_default):
        raise _unsupported("logprobs", body["logprobs"], f"{logprobs_default!r}".lower())


def _sampling(body: dict) -> tuple[dict, int | None, bool, bool]:
    """SamplingParams fields (OpenAI defaults: temperature 1, top_p 1), max_tokens, stream, include_usage."""
    fields: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise _bad("temperature", "a number between 0 and 2", temperature)
    fields["temperature"] = 1.0 if temperature is None else float(temperature)
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise _bad("top_p", "a number between 0 and 1", top_p)
    # top_p 0 keeps only the most likely token (the nucleus always holds one); the engine wants > 0.
    fields["top_p"] = 1.0 if top_p is None else max(float(top_p), 1e-9)
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or not -1 <= top_k < 2**31):
        raise _bad("top_k", "an integer in [0, 2**31) (0 or -1 switch it off)", top_k)
    fields["top_k"] = max(top_k or 0, 0)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", "an integer", seed)
    fields["seed"] = None if seed is None else seed % 2**32  # OpenAI takes any int64; the engine 32 bits
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise _bad("stop", "a non-empty string or a list of them", body["stop"])
    fields["stop"] = tuple(stop or ())
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None and (not isinstance(stop_ids, list) or len(stop_ids) <= MAX_STOP_TOKEN_IDS
                                 and not all(_is_int(t) and t >= 0 for t in stop_ids)):  # longer: SamplingParams says
        raise _bad("stop_token_ids", "a list of token ids", stop_ids)
    fields["stop_token_ids"] = tuple(stop_ids or ())
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", "a boolean", ignore_eos)
    fields["ignore_eos"] = bool(ignore_eos)

    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):  # the second, newer name wins
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(name, "a positive integer", value)
            max_tokens = value
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "a boolean", stream)
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options",
                           code="invalid_value")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise _bad("stream_options", 'an object like {"include_usage": true}', options)
    return fields, max_tokens, bool(stream), bool(options and options.get("include_usage"))


def _completion_prompts(prompt) -> list[Any]:
    """One prompt per choice: a string, a list of strings, token ids, or a list of token id lists."""
    if isinstance(prompt, str) and prompt:
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(_is_int(t) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) and p for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return list(prompt)
    raise _bad("prompt", "a non-empty string, a list of strings, a list of token ids or a list of such lists",
               prompt if not isinstance(prompt, str) else "")


def _chat_messages(messages) -> list[dict]:
    """Messages as {role, content} with string content, as the tokenizer's chat template wants."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "an object with role and content", m)
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _bad(f"{where}.role", f"one of {sorted(_ROLES)}", role)
        if isinstance(content, list):  # content parts: only text
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _unsupported(f"{where}.content", part, 'text parts {"type": "text", "text": ...}')
                parts.append(part["text"])
            content = "\n".join(parts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"{where}.content", "a string or a list of text parts", content)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_completion(body: dict) -> ParsedRequest:
    _check_fields(body, COMPLETION_FIELDS, logprobs_default=None)
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    prompts = _completion_prompts(body["prompt"])
    fields, max_tokens, stream, include_usage = _sampling(body)
    return ParsedRequest(prompts, 16 if max_tokens is None else max_tokens, fields, stream, include_usage,
                         "prompt")


def parse_chat(body: dict) -> ParsedRequest:
    _check_fields(body, CHAT_FIELDS, logprobs_default=False)
    if "messages" not in body:
        raise ApiError(400, "messages is required", param="messages", code="missing_required_parameter")
    messages = _chat_messages(body["messages"])
    fields, max_tokens, stream, include_usage = _sampling(body)
    return ParsedRequest([messages], max_tokens, fields, stream, include_usage, "messages")


def sampling_params(request: ParsedRequest, prompt_len: int, max_seq_len: int) -> SamplingParams:
    """The request's SamplingParams; without max_tokens it may use the rest of the context."""
    max_new = request.max_tokens if request.max_tokens is not None else max(max_seq_len - prompt_len, 1)
    try:
        return SamplingParams(max_new_tokens=max_new, **request.sampling)
    except ValueError as e:  # SamplingParams' own limits (stop), or a safety net
        raise ApiError(400, str(e), param=param_of(e), code="invalid_value") from e


def param_of(error: ValueError) -> str | None:
    """The request field a SamplingParams or engine error names: its message starts with the field."""
    field = str(error).split(" ", 1)[0]
    return {"max_new_tokens": "max_tokens"}.get(field, field) if field in _PARAM_FIELDS else None


_PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


# --- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
            "logprobs": None}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
