"""An OpenAI-compatible HTTP server over the engine, on the standard library.

  press serve --model smollm2-135m-instruct [--host 127.0.0.1] [--port 8000] [--api-key KEY]

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
  client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])

Endpoints: GET /health, GET /v1/models[/ID], POST /v1/completions, POST /v1/chat/completions
(stream=true sends server-sent events, ending with `data: [DONE]`). Request and response
shapes are OpenAI's (serve/openai_protocol.py validates the fields); errors are
{"error": {"message", "type", "param", "code"}} with the matching HTTP status.

Every HTTP request runs on its own thread and submits to the engine, whose scheduler batches
whatever is in flight (continuous batching), so concurrency needs nothing here. Prompts are
tokenized on that thread, never on the engine's; one too long for the context is refused
from its head alone, before the rest is tokenized.

Hostile and careless clients: a client that hangs up, streaming or not, has its requests
cancelled (the engine frees their rows at its next step); one request carries at most
`max_prompts` prompts (400 beyond); when the engine's queue is full (Engine.max_queued) the
answer is 429 with Retry-After; text that is not valid Unicode (a lone surrogate) is a 400.
SIGTERM or Ctrl-C drains: the server stops accepting, answers what is in flight (up to
`drain_seconds`), refuses new requests on open connections with 503, then stops. GET
/metrics serves Prometheus metrics (serve/metrics.py).

With --index DIR (a retrieval index, see retrieval/commands/index.py) chat completions are grounded:
the last user message is searched in the index, the best chunks are put into the prompt as
numbered sources to cite ([1], [2], ...; serve/rag.py), and a non-streamed response
carries them in an extra top-level "sources" list (number, doc_id, source, heading, start,
end, score, text). Plain completions are not changed.

With --api-key (or PRESS_API_KEY) every route but /health wants `Authorization: Bearer KEY`.
The default host is loopback; serving on another interface without a key prints a warning.
"""

from __future__ import annotations

import hmac
import json
import queue
import selectors
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import unquote, urlsplit

from serve import openai_protocol as api
from serve.engine import EngineBusy
from serve.metrics import ServerMetrics
from serve.openai_protocol import ApiError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_PROMPTS = 16  # prompts in one /v1/completions request (each takes an engine row)
DRAIN_SECONDS = 30.0  # after SIGTERM: how long requests in flight may take to finish
RETRY_AFTER_SECONDS = 1  # told to clients refused because the queue is full
CLIENT_CLOSED = 499  # the status metrics count a request under when its client hung up before the answer
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class Server(ThreadingHTTPServer):
    """The HTTP server: `server_address` is (host, port); `url` the base URL."""

    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = 128  # the listen backlog: many clients may connect at once

    def __init__(self, address: tuple[str, int], engine, *, api_key: str | None = None, log_requests: bool = False,
                 rag=None, max_prompts: int = MAX_PROMPTS):
        self.engine, self.api_key, self.log_requests = engine, api_key, log_requests
        self.rag = rag  # a serve.rag.RagPipeline: ground chat completions in its index
        self.max_prompts = max_prompts
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine)
        self.hangups = HangUpWatcher()
        self.draining = False  # set by drain(): new requests get 503
        self._in_flight = 0
        self._idle = threading.Condition()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks the host name up (socket.getfqdn), which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def in_flight(self) -> int:
        """HTTP requests being handled now."""
        return self._in_flight

    def _track(self, delta: int) -> None:
        with self._idle:
            self._in_flight += delta
            self.metrics.in_flight.set(self._in_flight)
            if self._in_flight == 0:
                self._idle.notify_all()

    def drain(self, seconds: float = DRAIN_SECONDS) -> int:
        """Stop accepting connections, let requests in flight finish for up to `seconds`, then close
        the engine (what is still running then ends with an error). Call it from another thread than
        serve_forever's. Returns the requests still in flight at the deadline."""
        self.draining = True
        self.shutdown()  # the accept loop ends; connections already open are still answered
        self.socket.close()  # new connections are refused at once
        deadline = time.monotonic() + seconds
        with self._idle:
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            cut = self._in_flight
        self.engine.close()
        self.hangups.close()
        return cut

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], _CLIENT_GONE):
            return  # the client went away: nothing to answer, nothing to log
        super().handle_error(request, client_address)


class HangUpWatcher:
    """One thread that notices clients hanging up while their non-streaming answers are generated,
    and cancels those requests. It sleeps in epoll on the waiting connections: no request thread
    polls, so many waiting clients cost nothing until one of them closes."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._run, name="press-hangups", daemon=True).start()

    def watch(self, sock: socket.socket, requests) -> None:
        with self._lock:
            self._selector.register(sock, selectors.EVENT_READ, requests)

    def unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):  # already dropped by the watcher
                pass

    def close(self) -> None:
        self._closed = True

    def _run(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(timeout=0.5):
                sock, requests = key.fileobj, key.data
                try:
                    gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                self.unwatch(sock)  # readable either way: a hang-up, or a pipelined next request
                if gone:
                    for r in requests:
                        r.cancel()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections
    server_version = "press"
    timeout = 120  # seconds a socket read or write may block (an idle keep-alive connection, a stalled client)
    server: Server

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format, *args) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    # --- routing

    def _handle(self, method: str) -> None:
        self._body_pending = method == "POST"  # an unread body forces the connection closed after the answer
        self._streaming = False
        self._status = None
        path = urlsplit(self.path).path.rstrip("/") or "/"
        self.server._track(+1)
        try:
            self._route(method, path)
        finally:
            self.server._track(-1)
            route = path if path in ROUTES else "other"
            self.server.metrics.requests.labels(route, str(self._status or 0)).inc()

    def _route(self, method: str, path: str) -> None:
        try:
            if self.server.draining:
                self.server.metrics.rejected.labels("draining").inc()
                self.close_connection = True
                raise ApiError(503, "the server is shutting down; retry against another instance",
                               code="server_shutting_down")
            if path != "/health":
                self._authorize()
            if path == "/metrics":
                self._only(method, "GET")
                self._send_bytes(200, self.server.metrics.render(), self.server.metrics.content_type)
            elif path == "/health":
                self._only(method, "GET")
                self._send_json(200, {"status": "ok"})
            elif path == "/v1/models":
                self._only(method, "GET")
                engine = self.server.engine
                self._send_json(200, {"object": "list",
                                      "data": [self._model_card(name) for name in (engine.name, *engine.adapters)]})
            elif path.startswith("/v1/models/"):
                self._only(method, "GET")
                name = unquote(path.removeprefix("/v1/models/"))  # clients percent-encode an id's "/" and non-ASCII
                self._check_model(name)
                self._send_json(200, self._model_card(name))
            elif path in ("/v1/completions", "/v1/chat/completions"):
                self._only(method, "POST")
                self._generate(self._read_json(), chat=path == "/v1/chat/completions")
            else:
                raise ApiError(404, f"no route {method} {path}; see /v1/models, /v1/completions, "
                                    "/v1/chat/completions, /health, /metrics", code="not_found")
        except ApiError as e:
            self._send_error(e)
        except _CLIENT_GONE:
            self.close_connection = True
            self._status = self._status or CLIENT_CLOSED  # counted as nginx counts it: 499
        except Exception as e:  # noqa: BLE001 - answer 500 and keep serving
            traceback.print_exc()
            self._send_error(ApiError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error"))

    def _only(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise ApiError(405, f"{self.path} takes {allowed}, not {method}", code="method_not_allowed")

    def _authorize(self) -> None:
        key = self.server.api_key
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY' "
                                "with the key the server was started with", code="invalid_api_key")

    def _model_card(self, name: str) -> dict:
        engine = self.server.engine
        card = {"id": name, "object": "model", "created": self.server.created, "owned_by": "press"}
        if name != engine.name:  # a LoRA adapter served on the base
            card.update(parent=engine.name, root=engine.name)
        return card

    def _check_model(self, model) -> str | None:
        """The served adapter `model` names (None: the base model); 404 for anything not served."""
        engine = self.server.engine
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"model must be a string, got {model!r}", param="model", code="invalid_value")
        if model is None or model == engine.name:
            return None
        if model not in engine.adapters:
            served = ", ".join(f"`{name}`" for name in (engine.name, *engine.adapters))
            raise ApiError(404, f"The model `{model}` does not exist: this server serves {served}", param="model",
                           code="model_not_found")
        return model

    # --- bodies and answers

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or "Content-Length" not in self.headers:
            raise ApiError(411, "send the JSON body with a Content-Length header", code="length_required")
        if len(set(self.headers.get_all("Content-Length"))) > 1:  # which one ends the body? (request smuggling)
            raise ApiError(400, f"conflicting Content-Length headers {self.headers.get_all('Content-Length')}; send one",
                           code="invalid_request")  # the body unread: the connection closes after the answer
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(400, f"bad Content-Length {self.headers['Content-Length']!r}", code="invalid_request")
        if length > MAX_BODY_BYTES:
            raise ApiError(413, f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}", code="request_too_large")
        raw = self.rfile.read(length)
        self._body_pending = False
        if len(raw) < length:
            raise ConnectionResetError("the client sent less than Content-Length")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def _send_json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def _send_bytes(self, status: int, data: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self._body_pending or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: ApiError) -> None:
        try:
            if self._streaming:  # headers are gone: an error event, then end the stream
                self._send_event({"error": error.body()["error"]})
                self._end_stream()
            else:
                headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
                if error.status == 429:
                    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
                self._send_json(error.status, error.body(), headers)
        except _CLIENT_GONE:
            self.close_connection = True

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True

    def _send_event(self, obj) -> None:
        data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))  # one HTTP chunk per event

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self._streaming = False

    # --- generation

    def _generate(self, body: dict, *, chat: bool) -> None:
        adapter = self._check_model(body.get("model"))
        parsed = api.parse_chat(body) if chat else api.parse_completion(body)
        if len(parsed.prompts) > self.server.max_prompts:
            raise ApiError(400, f"{len(parsed.prompts)} prompts in one request; the limit is {self.server.max_prompts} "
                                "(send several requests)", param="prompt", code="too_many_prompts")
        engine = self.server.engine
        sources = None
        if chat and self.server.rag is not None:  # every choice has the same messages: retrieve once
            try:
                grounding = self.server.rag.ground(parsed.prompts[0], max_new_tokens=parsed.max_tokens or 256)
            except ValueError as e:
                raise ApiError(400, f"invalid messages: {e}", param="messages", code="invalid_prompt") from None
            parsed.prompts = [grounding.messages] * len(parsed.prompts)
            sources = [s.to_json() for s in grounding.sources]
        # Encode and check every prompt before queueing any, so a 400 leaves nothing running.
        prepared = []
        for prompt in parsed.prompts:
            try:
                ids = engine.encode(prompt)
            except ValueError as e:
                raise ApiError(400, f"invalid {parsed.prompt_param}: {e}", param=parsed.prompt_param,
                               code="invalid_prompt") from None
            params = api.sampling_params(parsed, len(ids), engine.max_seq_len)
            try:
                engine.check_fits(len(ids), params.max_new_tokens)
            except ValueError as e:
                raise ApiError(400, str(e), param=parsed.prompt_param, code="context_length_exceeded") from None
            prepared.append((ids, params))
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            requests = engine.submit_many([ids for ids, _ in prepared], [p for _, p in prepared],
                                          request_id=response_id, adapter=adapter)
        except EngineBusy as e:
            self.server.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, str(e), code="rate_limit_exceeded", type="rate_limit_error") from None
        except ValueError as e:
            raise ApiError(400, str(e), param=api.param_of(e), code="invalid_value") from None
        for r in requests:
            r.add_done_callback(self.server.metrics.observe)
        head = {"id": response_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": adapter or engine.name}
        if parsed.stream:
            try:
                return self._stream(requests, head, chat=chat, include_usage=parsed.include_usage)
            except _CLIENT_GONE:
                for r in requests:  # free the rows now instead of generating for nobody
                    r.cancel()
                raise
        self._wait_or_cancel(requests)
        outputs = [r.result() for r in requests]
        for out in outputs:
            if out.finish_reason == "error":
                raise ApiError(500, f"generation failed: {out.error}", code="engine_error")
        choice = api.chat_choice if chat else api.completion_choice
        self._send_json(200, {
            **head,
            "choices": [choice(i, out.text, out.finish_reason) for i, out in enumerate(outputs)],
            "usage": _usage(outputs),
            **({} if sources is None else {"sources": sources}),
        })

    def _wait_or_cancel(self, requests) -> None:
        """Wait for the requests; if the client hangs up meanwhile, the server's watcher cancels them
        (their rows are freed at the engine's next step) and this connection ends."""
        self.server.hangups.watch(self.connection, requests)
        try:
            for r in requests:
                r.wait()
        finally:
            self.server.hangups.unwatch(self.connection)
        if any(r.output.finish_reason == "cancelled" for r in requests):
            raise ConnectionResetError("the client closed the connection before the answer")

    def _stream(self, requests, head: dict, *, chat: bool, include_usage: bool) -> None:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if include_usage:
            head["usage"] = None  # OpenAI's shape: null on every chunk but the last

        def chunk(index: int, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
            if not chat:
                return {**head, "choices": [api.completion_choice(index, text or "", finish_reason)]}
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            return {**head, "choices": [api.chat_chunk_choice(index, delta, finish_reason)]}

        self._start_stream()
        if chat:
            for i in range(len(requests)):
                self._send_event(chunk(i, None, role=True))
        for index, delta in _merged_deltas(requests):
            if delta is not None:
                self._send_event(chunk(index, delta))
                continue
            out = requests[index].result()
            if out.finish_reason == "error":
                raise ApiError(500, f"generation failed: {out.error}", code="engine_error")
            self._send_event(chunk(index, None, out.finish_reason))
        if include_usage:
            self._send_event({**head, "choices": [], "usage": _usage([r.result() for r in requests])})
        self._send_event(b"[DONE]")
        self._end_stream()


ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


def _usage(outputs) -> dict:
    return api.usage(sum(len(o.prompt_token_ids) for o in outputs), sum(len(o.token_ids) for o in outputs))


def _merged_deltas(requests) -> Iterator[tuple[int, str | None]]:
    """(choice index, text delta) as the requests generate; (index, None) when one ends."""
    if len(requests) == 1:
        yield from ((0, d) for d in requests[0].deltas())
        yield 0, None
        return
    events: queue.Queue = queue.Queue()

    def pump(index, request):
        for d in request.deltas():
            events.put((index, d))
        events.put((index, None))

    for i, r in enumerate(requests):
        threading.Thread(target=pump, args=(i, r), daemon=True).start()
    for _ in range(len(requests)):
        while (event := events.get())[1] is not None:
            yield event
        yield event


def make_server(engine, host: str = "127.0.0.1", port: int = 0, api_key: str | None = None, *,
                log_requests: bool = False, rag=None, max_prompts: int = MAX_PROMPTS) -> Server:
    """A server bound to (host, port), not yet serving: call `serve_forever()` (in a thread if you like).

    port 0 picks a free one: read it from `server.server_address[1]`. rag: a
    serve.rag.RagPipeline over `engine` to ground chat completions (see the module docstring).
    max_prompts: the most prompts one /v1/completions request may carry.
    """
    return Server((host, port), engine, api_key=api_key, log_requests=log_requests, rag=rag, max_prompts=max_prompts)


def serve_forever(engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, *,
                  log_requests: bool = True, out=None, rag=None, max_prompts: int = MAX_PROMPTS,
                  drain_seconds: float = DRAIN_SECONDS) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain: stop accepting, let requests in flight finish
    for up to `drain_seconds`, close the engine."""
    out = out or sys.stdout
    server = make_server(engine, host, port, api_key, log_requests=log_requests, rag=rag, max_prompts=max_prompts)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"press serve: warning: listening on {host} with no API key; anyone who can reach it "
                         "can use it (pass --api-key)\n")
    drafting = (f" with draft {engine.draft_name} ({engine.draft_tokens} tokens a step)"
                if getattr(engine, "draft_tokens", 0) else "")
    out.write(f"press serve: {engine.name}{drafting} at {server.url}/v1 (OpenAI API; Ctrl-C or SIGTERM drains and "
              "stops)\n")
    out.flush()
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):  # `kill`, `docker stop`, Ctrl-C: drain, then stop
            signal.signal(sig, lambda signum, frame: stop.set())
    accepting = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="press-accept",
                                 daemon=True)
    accepting.start()
    try:
        while not stop.wait(0.5) and accepting.is_alive():
            pass
    except KeyboardInterrupt:
        pass
    start = time.monotonic()
    waiting = server.in_flight
    sys.stderr.write(f"press serve: stopping; draining {waiting} requests in flight (up to {drain_seconds:g} s)\n")
    cut = server.drain(drain_seconds)
    sys.stderr.write(f"press serve: stopped after {time.monotonic() - start:.1f} s"
                     + (f"; {cut} requests were cut at the deadline\n" if cut else "\n"))
    server.server_close()
