"""The OpenAI-compatible server on the real SmolLM2, driven by the official openai client over loopback."""

import http.client
import json
import socket
import threading
import time
import urllib.request

import openai
import pytest

from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.server import MAX_BODY_BYTES, make_server
from tests.reference import run_concurrently

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "In 1905, Albert Einstein published",
    "Ingredients: 2 cups of flour,",
]
CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained(MODEL, max_slots=4, max_seq_len=256) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    server = make_server(engine, api_key=KEY)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def greedy(engine, prompt, n):
    return engine.generate(prompt, SamplingParams(max_new_tokens=n, temperature=0.0))[0]


def post(server, path, body, headers=None, key=KEY):
    """A raw POST: (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=120)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    conn.request("POST", path, data, {"Content-Type": "application/json", **auth, **(headers or {})})
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw


def test_completion_greedy_equals_engine(engine, client):
    want = greedy(engine, PROMPTS[0], 12)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == MODEL
    assert len(got.choices) == 1 and got.choices[0].index == 0 and got.choices[0].logprobs is None
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_stream_equals_engine(engine, client):
    want = greedy(engine, PROMPTS[1], 16)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == want.text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == want.finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completion_prompt_forms(engine, client):
    """A list of prompts gives one choice each, in order; token ids are a prompt too."""
    want = [greedy(engine, p, 8) for p in PROMPTS[:2]]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    assert [(c.index, c.text) for c in got.choices] == [(0, want[0].text), (1, want[1].text)]
    assert got.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    ids = engine.encode(PROMPTS[0])
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == want[0].text and by_ids.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, temperature=0, stream=True)
    texts = ["", ""]
    for c in streamed:
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == [w.text for w in want]


def test_stop_strings_pass_through(engine, client):
    full = greedy(engine, PROMPTS[2], 24).text
    stop = full.split()[3]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_chat_greedy_equals_engine(engine, client):
    want = greedy(engine, CHAT, 24)
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24, temperature=0)
    assert got.id.startswith("chatcmpl-") and got.object == "chat.completion" and got.model == MODEL
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))


def test_chat_stream_equals_engine(engine, client):
    want = greedy(engine, CHAT, 24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len(deltas) > 3 and "".join(deltas) == want.text
    assert chunks[-2].choices[0].finish_reason == want.finish_reason and chunks[-2].choices[0].delta.content is None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_stream_wire_format(server):
    """Server-sent events over chunked HTTP: `data: {json}` events, then `data: [DONE]`."""
    conn = http.client.HTTPConnection(*server.server_address, timeout=120)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
    events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    conn.close()


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    encoded = "".join(f"%{b:02X}" for b in MODEL.encode())  # every byte percent-encoded, as a client may send it
    with urllib.request.urlopen(urllib.request.Request(f"{server.url}/v1/models/{encoded}",
                                                       headers={"Authorization": f"Bearer {KEY}"}), timeout=30) as r:
        assert json.load(r)["id"] == MODEL
    with urllib.request.urlopen(f"{server.url}/health", timeout=30) as r:  # no key needed
        assert json.load(r) == {"status": "ok"}


def test_wrong_or_missing_key_is_401(server):
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, body = post(server, "/v1/completions", {"prompt": "Hi"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
        ("/v1/completions", {"prompt": "Hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "Hi", "top_p": 1.5}, "top_p"),
        ("/v1/completions", {"prompt": "Hi", "stop": 3}, "stop"),
        ("/v1/completions", {"prompt": "Hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "Hi", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 2}, "logprobs"),
        ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "Hi", "frobnicate": {"x": [1]}}, "frobnicate"),
        ("/v1/completions", {"prompt": 5}, "prompt"),
        ("/v1/completions", {"prompt": [99999999]}, "prompt"),
        ("/v1/completions", {"max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": "Hi", "model": 7}, "model"),
        ("/v1/chat/completions", {"messages": "Hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role"),
        ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ("/v1/chat/completions", {"messages": CHAT, "presence_penalty": 0.5}, "presence_penalty"),
        ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, path, body, param):
    status, answer = post(server, path, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_defined_fields_at_their_defaults_are_accepted(server):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "user": "u", "n": 1, "echo": False, "logprobs": None,
            "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "top_k": 5, "seed": 2**40}
    status, answer = post(server, "/v1/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 2,
            "metadata": {"any": "thing"}, "parallel_tool_calls": "ignored", "response_format": {"type": "text"}}
    status, answer = post(server, "/v1/chat/completions", chat)
    assert status == 200 and answer["choices"][0]["message"]["role"] == "assistant"


def test_malformed_requests(server):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100000):
        status, answer = post(server, "/v1/completions", raw)
        assert status == 400 and answer["error"]["code"] == "invalid_json", raw[:10]
    # Too large: refused from the headers alone, before the body is read.
    conn = http.client.HTTPConnection(*server.server_address, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    status, answer = post(server, "/v1/nothing-here", {})
    assert status == 404 and answer["error"]["code"] == "not_found"
    # Two lengths: which one ends the body is a proxy's guess against ours (request smuggling).
    body = b'{"prompt": "hi", "max_tokens": 2}'
    sock = socket.create_connection(server.server_address, timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: 5\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    answer = b""
    while chunk := sock.recv(65536):  # answered, then closed: the rest is never read as a request
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400") and b"conflicting Content-Length" in answer and answer.count(b"HTTP/1.1") == 1


def test_prompt_longer_than_the_context_is_400(engine, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hello " * 300, max_tokens=4)
    assert "exceeds the engine's context of 256 tokens" in e.value.message
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # chat's default max_tokens is the rest of the context
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello " * 300}])


def test_concurrent_clients_are_batched(engine, client):
    want = [greedy(engine, p, 10).text for p in PROMPTS]
    steps = engine.stats["decode_steps"]

    def ask(i):
        r = client.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=10, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens

    results, errors = run_concurrently(ask, 8)
    assert not errors and len(results) == 8
    assert all(results[i][0] == want[i % 4] for i in range(8))
    # Batched: fewer decode steps than tokens generated.
    assert engine.stats["decode_steps"] - steps < sum(n for _, n in results.values())


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(engine, server, client, capfd):
    sock = socket.create_connection(server.server_address, timeout=60)
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                 + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    got = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=4, temperature=0)
    assert got.choices[0].text
    deadline = time.monotonic() + 60
    while any(engine._slots) and time.monotonic() < deadline:  # the abandoned request runs to its end
        time.sleep(0.05)
    time.sleep(0.2)  # its handler thread writes once more, meets the closed socket and returns
    assert "Traceback" not in capfd.readouterr().err


def test_load_of_mixed_requests_has_no_errors(client):
    errors, answered = [], []

    def user(i):
        for j in range(2):
            try:
                if (i + j) % 4 == 0:
                    text = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6,
                                                          temperature=0.8, seed=i).choices[0].message.content
                elif (i + j) % 4 == 1:
                    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in stream)
                elif (i + j) % 4 == 2:
                    stream = client.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=6, stream=True)
                    text = "".join(c.choices[0].text for c in stream)
                else:
                    text = client.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=6,
                                                     top_p=0.9, extra_body={"top_k": 20}).choices[0].text
                answered.append(text)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(answered) == 32
