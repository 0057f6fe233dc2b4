"""The server under hostile and careless clients, on a tiny random model with SmolLM2's tokenizer:
hang-ups cancel their work, fan-out and queue limits, poisoned text, oversized prompts, SIGTERM
drains, and Prometheus metrics."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from compress.formats import hf_decoder
from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.server import make_server
from tests.devices import xla_flags
from tests.tiny_decoder import tiny_decoder


@pytest.fixture(scope="module")
def tiny():
    """(config, params, tokenizer) of a tiny random Llama that never emits EOS (it has none)."""
    return tiny_decoder(max_position_embeddings=8192)


def _serve(engine, **kwargs):
    server = make_server(engine, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture
def served(tiny):
    """A server over a fresh 2-row engine whose queue holds at most 2 requests."""
    config, params, tokenizer = tiny
    engine = Engine(params, config, tokenizer, max_slots=2, max_seq_len=4096, max_queued=2)
    server, thread = _serve(engine, max_prompts=4)
    yield server, engine
    server.shutdown()
    server.server_close()
    engine.close()
    thread.join()


def _request(server, path, body, method="POST"):
    """(status, headers, parsed JSON or text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, data if method == "POST" else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    try:
        return response.status, dict(response.getheaders()), json.loads(raw)
    except ValueError:
        return response.status, dict(response.getheaders()), raw


def _hang_up_after_sending(server, body) -> None:
    """Send a whole request, then close the socket without reading the answer."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(server.server_address)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    time.sleep(0.3)  # admitted and generating
    sock.close()


def _until(condition, seconds=20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_client_that_hangs_up_has_its_request_cancelled(served):
    server, engine = served
    for stream in (False, True):
        before = engine.stats["cancelled"]
        _hang_up_after_sending(server, {"prompt": "Once upon a time", "max_tokens": 4000, "stream": stream})
        assert _until(lambda: engine.stats["cancelled"] > before and engine.running == 0), (stream, engine.stats)
    # 4000 tokens each were asked for; both rows were freed long before.
    assert engine.stats["generated_tokens"] < 4000
    status, _, body = _request(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    metrics = _request(server, "/metrics", None, method="GET")[2]
    assert 'press_requests_total{route="/v1/completions",status="499"} 1.0' in metrics  # the non-streaming one
    assert "press_cancelled_requests_total 2.0" in metrics


def test_prompts_per_request_are_capped(served):
    server, engine = served
    status, _, body = _request(server, "/v1/completions", {"prompt": ["a"] * 5, "max_tokens": 1})
    assert status == 400 and body["error"]["code"] == "too_many_prompts" and "limit is 4" in body["error"]["message"]
    status, _, body = _request(server, "/v1/completions", {"prompt": ["a"] * 4, "max_tokens": 1})
    assert status == 200 and len(body["choices"]) == 4


def test_a_full_queue_answers_429_with_retry_after(served):
    server, engine = served
    long = SamplingParams(max_new_tokens=4000)
    first = engine.submit_many(["a", "b"], [long, long])  # both rows busy
    assert _until(lambda: engine.running == 2)
    queued = engine.submit_many(["c", "d"], [long, long])  # the queue's 2 places
    try:
        status, headers, body = _request(server, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 9})
        assert status == 429 and headers["Retry-After"] == "1", body
        assert body["error"]["type"] == "rate_limit_error" and "limit is 2" in body["error"]["message"]
    finally:
        for r in first + queued:
            r.cancel()
    assert _until(lambda: engine.running == 0 and engine.queued == 0)
    metrics = _request(server, "/metrics", None, method="GET")[2]
    assert 'press_rejected_requests_total{reason="queue_full"} 1.0' in metrics


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": ["fine", "x\\udfffy"], "max_tokens": 2}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}'),
])
def test_a_lone_surrogate_is_a_400_naming_it(served, path, body, capfd):
    server, _ = served
    status, _, answer = _request(server, path, body)
    assert status == 400, answer
    assert "lone surrogate" in answer["error"]["message"]
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("field, value, param", [
    # 300,000 of them in one 4.5 MB body held a 2-core engine's every step for 78 s
    ("stop", [f"zq{i}zq" for i in range(300_000)], "stop"),
    ("stop", "x" * 1000, "stop"),
    ("stop", "end \ud800", "stop"),
    ("top_k", 2**40, "top_k"),
    ("stop_token_ids", [10**20], "stop_token_ids"),  # checked by the engine, which knows the vocabulary
    ("stop_token_ids", [1] * 800_000, "stop_token_ids"),
])
def test_sampling_settings_beyond_their_limits_are_a_400_naming_them(served, field, value, param, capfd):
    server, engine = served
    body = json.dumps({"prompt": "hi", "max_tokens": 2, field: value}).encode()
    status, _, answer = _request(server, "/v1/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and field in answer["error"]["message"]
    assert engine.running == 0 and engine.queued == 0 and "Traceback" not in capfd.readouterr().err


def _lengths_passed(monkeypatch, obj, method: str) -> list[int]:
    """The len() of the first argument of every call of obj's `method` from now on (it still runs)."""
    real, lengths = getattr(type(obj), method), []

    def counting(self, first, *args, **kwargs):
        lengths.append(len(first))
        return real(self, first, *args, **kwargs)

    monkeypatch.setattr(type(obj), method, counting)
    return lengths


def test_an_oversized_prompt_is_refused_from_its_head(served, monkeypatch):
    server, engine = served
    tokenized = _lengths_passed(monkeypatch, engine.tokenizer, "__call__")
    prompt = "press " * 400_000  # 2.4 MB, about 800k tokens
    status, _, body = _request(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
    assert status == 400 and "more than the engine's context of 4096" in body["error"]["message"]
    assert sum(tokenized) <= 4096 * 8  # only the head was tokenized
    huge = "x" * (4096 * 64 + 1)  # beyond what any tokenization could fit: refused before tokenizing
    tokenized.clear()
    status, _, body = _request(server, "/v1/completions", {"prompt": huge, "max_tokens": 2})
    assert status == 400 and tokenized == []


def test_more_messages_than_the_context_holds_are_refused_before_the_template(served, monkeypatch):
    # 200,000 empty messages (a 6.6 MB body) took 3.8 s in the chat template before their 400.
    server, engine = served
    rendered = _lengths_passed(monkeypatch, engine.tokenizer, "apply_chat_template")
    many = [{"role": "user", "content": ""}] * 4097
    status, _, body = _request(server, "/v1/chat/completions", {"messages": many, "max_tokens": 2})
    assert status == 400 and "the messages are 4097, more than the engine's context of 4096 tokens" in \
        body["error"]["message"]
    assert rendered == []
    status, _, body = _request(server, "/v1/chat/completions", {"messages": many[:3], "max_tokens": 2})
    assert status == 200 and rendered == [3]


def test_encoding_never_holds_up_decoding(served):
    """A long encode (its lock held) does not stop requests already generating."""
    _, engine = served
    [request] = engine.submit_many(["Once upon a time"], [None])
    with engine._tokenizer_lock:  # as a long prompt being tokenized on a request thread would
        assert request.wait(120) and request.output.finish_reason == "length"


def test_one_failing_row_ends_only_its_request(served, monkeypatch):
    """A row that fails mid-generation (here: its detokenizing) ends with an error; the others and
    the engine go on."""
    _, engine = served
    real = Engine._detokenize

    def failing(self, request, final=False):
        if request.id.startswith("bad") and len(request.token_ids) > 2:
            raise RuntimeError("cannot decode this row")
        return real(self, request, final)

    monkeypatch.setattr(Engine, "_detokenize", failing)
    good, bad = engine.submit_many(["Once upon", "Once upon"], [SamplingParams(max_new_tokens=20)] * 2)
    bad_too = engine.submit("Hello", SamplingParams(max_new_tokens=20), request_id="bad-1")
    assert good.result(120).finish_reason == "length" and len(good.output.token_ids) == 20
    assert bad_too.result(120).finish_reason == "error" and "cannot decode this row" in bad_too.output.error
    assert bad.result(120).finish_reason == "length"
    assert engine.generate("again", SamplingParams(max_new_tokens=3))[0].finish_reason == "length"


def test_prompts_near_the_context_limit_share_compiled_widths(tiny):
    """Prompts too long for their power-of-two bucket prefill at a multiple of 16, not at their
    exact length: a client varying its prompt length cannot force a compile per length."""
    config, params, tokenizer = tiny
    with Engine(params, config, tokenizer, max_slots=1, max_seq_len=64) as engine:
        engine.generate([1] * 33, SamplingParams(max_new_tokens=16))
        compiled = engine._prefill_insert._cache_size()
        outs = [engine.generate([1] * n, SamplingParams(max_new_tokens=16))[0] for n in (35, 40, 47)]
        assert all(o.finish_reason == "length" for o in outs)
        assert engine._prefill_insert._cache_size() == compiled  # all in the 48-wide program


def test_metrics_count_requests_tokens_and_status(served):
    server, engine = served
    assert _request(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 5})[0] == 200
    assert _request(server, "/v1/nowhere", {})[0] == 404
    status, headers, text = _request(server, "/metrics", None, method="GET")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['press_requests_total{route="/v1/completions",status="200"}']) == 1
    assert float(lines['press_requests_total{route="other",status="404"}']) == 1
    assert float(lines["press_generated_tokens_total"]) == 5
    assert float(lines["press_prompt_tokens_total"]) >= 1
    assert float(lines["press_request_latency_seconds_count"]) == 1
    assert float(lines["press_time_to_first_token_seconds_count"]) == 1
    assert lines["press_queue_depth"] == "0.0" and lines["press_slots_in_use"] == "0.0"
    # one row generating 5 tokens: its prefill gave the first, 4 decode steps of one row the rest
    assert float(lines['press_decode_rows_total{kind="busy"}']) == 4
    assert float(lines['press_decode_rows_total{kind="computed"}']) == 4
    assert float(lines['press_prefill_chunk_tokens_total{kind="computed"}']) == 0  # nothing decoded beside it


def test_metrics_count_the_rows_moved(served):
    # Two rows at once; the first ends, so the second moves down to row 0 and decodes in a 1-row step.
    server, engine = served
    engine.generate(["Hello", "Hello there"], [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=8)])
    status, _, text = _request(server, "/metrics", None, method="GET")
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert status == 200 and float(lines["press_rows_moved_total"]) == engine.stats["rows_moved"] == 1


def test_sigterm_drains_requests_in_flight(tiny, tmp_path):
    """`press serve` stops accepting on SIGTERM and still answers the request it was generating."""
    config, params, tokenizer = tiny
    model = str(tmp_path / "tiny")
    hf_decoder.export(params, config, model, tokenizer=tokenizer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "serve.cli", "serve", "--model", model, "--port", str(port),
                                "--max-slots", "2", "max_seq_len=1024", "drain_seconds=300"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert "press serve:" in process.stdout.readline()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 600}),
                     {"Content-Type": "application/json"})
        time.sleep(1.0)  # accepted and generating
        process.send_signal(signal.SIGTERM)
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 200 and body["usage"]["completion_tokens"] == 600, (body, process.stderr.read())
        assert process.wait(60) == 0
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        err = process.stderr.read()
        assert "draining 1 requests in flight" in err and "cut at the deadline" not in err, err
    finally:
        if process.poll() is None:
            process.kill()
