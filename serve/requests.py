"""A request's life outside the engine's loop: what a caller holds while it generates, and what it gets back.

`Engine.submit` returns a Request (stream its text with `deltas()`, wait with `result()`,
`cancel()` when the client has gone); the engine's loop fills it and ends it with a
RequestOutput. The prompt types the engine takes and the checks every text prompt meets
before any work is spent on it live here too.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

from compress.errors import InputError
from serve.sampling import SamplingParams

Prompt = str | Sequence[dict] | Sequence[int]  # text, chat messages, or token ids


class EngineBusy(RuntimeError):
    """The engine's queue is full (Engine.max_queued): retry later."""



@dataclasses.dataclass
class RequestOutput:
    """The result of one request. Times are seconds; finish_reason is 'stop', 'length', 'error' or 'cancelled'."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    error: str | None = None
    queued_seconds: float = 0.0  # from submit to the start of its prefill
    time_to_first_token: float = 0.0  # from submit to the first token
    total_seconds: float = 0.0  # from submit to the end

    @property
    def decode_tokens_per_second(self) -> float:
        decode = self.total_seconds - self.time_to_first_token
        return (len(self.token_ids) - 1) / decode if len(self.token_ids) > 1 and decode > 0 else float("nan")


class Request:
    """A submitted request: iterate `deltas()` for streamed text, or wait on `result()`."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.seed = seed
        self.token_ids: list[int] = []
        self.text = ""
        self._emitted = 0  # characters of text already streamed
        self._prefix_offset = self._read_offset = 0  # incremental detokenization (see Engine._detokenize)
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.output: RequestOutput | None = None
        self._callbacks: list[Callable[[RequestOutput], None]] = []
        self._callback_lock = threading.Lock()
        self.submitted = time.perf_counter()
        self.started = self.first_token = None
        self.block_keys: list[bytes] = []  # chained keys of its prompt's blocks (prefix cache)
        self.group = None  # its submission (serve/scheduler.py shares rows between submissions)
        self.preemptions = 0  # times it gave up its row to another submission and was prefilled again
        self.adapter = 0  # the engine's adapter it runs (1-based; 0: the base model)
        self.filled: int | None = None  # while filled in chunks: tokens of context_ids in its row
        self.ngrams = None  # with a lookup draft, its context's n-grams (serve/speculative.py Ngrams)

    @property
    def context_ids(self) -> list[int]:
        """What a prefill of this request runs: its prompt, then the tokens generated before it
        gave up its row (none the first time)."""
        return self.prompt_ids + self.token_ids if self.token_ids else self.prompt_ids

    def deltas(self) -> Iterator[str]:
        """Yield text as it is generated, until the request finishes."""
        while True:
            item = self._events.get()
            if item is None:
                return
            yield item

    def result(self, timeout: float | None = None) -> RequestOutput:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.output

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the request finishes (at most `timeout` seconds); whether it has."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[RequestOutput], None]) -> None:
        """Call fn(output) when the request finishes (at once if it has), on the engine's thread."""
        with self._callback_lock:
            if not self.done:
                self._callbacks.append(fn)
                return
        fn(self.output)

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the row is freed at the next step."""
        self.cancelled = True

    # --- engine side

    def _emit(self, text: str) -> None:
        if text:
            self._events.put(text)

    def _finish(self, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        self.output = RequestOutput(
            self.id,
            self.prompt_ids,
            self.text,
            list(self.token_ids),
            reason,
            error,
            queued_seconds=(self.started or now) - self.submitted,
            time_to_first_token=(self.first_token or now) - self.submitted,
            total_seconds=now - self.submitted,
        )
        self._events.put(None)
        with self._callback_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self.output)
