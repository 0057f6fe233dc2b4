"""Hostile clients beside well-behaved ones against `press serve` on loopback, for a bounded time.

One server (`press serve`, its own process) and two phases of --seconds each against it, run
in --rounds segments that alternate (baseline, hostile, baseline, ...), so that a drift in the
machine's own speed falls on both alike:
  1. baseline: W well-behaved openai clients looping over short chat requests (max_tokens 32);
  2. the same W clients while hostile ones run beside them, each kind in its own paced loop:
     - disconnect: a non-streaming completion (max_tokens 200, ignore_eos), the socket closed after 0.2 s;
     - disconnect_stream: a streaming chat completion, the socket closed after the first event;
     - slowloris: a handful of connections sending their headers one byte a second, never finishing;
     - fanout_16: one /v1/completions request of 16 prompts, max_tokens 64 each (200 expected);
     - fanout_10000: one of 10,000 prompts (400 expected: beyond the server's max_prompts);
     - oversized: a ~7.9 MB prompt, under the body limit but far beyond the context (400 expected, quickly);
     - stop_flood: a completion with 300,000 stop strings, a 5.9 MB body (400 expected: beyond the
       16 a request may give; before that limit one such request stalled the engine for 78 s).
The figures: well-behaved p50/p95 latency and errors in each phase, the p95 ratio (goal: at most
1.5 with no well-behaved error), what each hostile kind got back (status codes), and the server's
cancellation and rejection counters from GET /metrics, and what the engine computed in each
phase (steps, seconds, rows and chunk tokens computed and busy), and the CPU seconds the server
and the clients spent in each. Exit status 1 if a well-behaved request failed. --kinds runs only
some hostile kinds, to see what each costs.

  .venv/bin/python benchmarks/hostile_clients.py [--well-behaved 8] [--seconds 60] [--rounds 2]
      [--max-slots 16] [--slow 4] [--kinds disconnect,fanout_16,...] [--out bench-results/hostile.json]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from common import log, write_result
from server_load import QUESTIONS, free_port, start_server, wait_ready

HOST = "127.0.0.1"
P95_GOAL = 1.5  # well-behaved p95 with the hostile clients over without, at most
OVERSIZED_CHARS = 7_900_000  # the JSON body stays under the server's 8 MiB limit
STOP_FLOOD = 300_000  # stop strings in one stop_flood request
SLOW_BYTE_SECONDS = 1.0
# (kind, seconds between two attempts of one loop): each kind's own pacing.
PACING = {"disconnect": 0.5, "disconnect_stream": 0.5, "fanout_16": 1.0, "fanout_10000": 2.0, "oversized": 2.0,
          "stop_flood": 2.0}
# What each kind should get; anything else is counted under "unexpected".
EXPECTED = {"disconnect": {"hung_up"}, "disconnect_stream": {"hung_up_after_first_event"},
            "slowloris": {"still_open"}, "fanout_16": {"200"}, "fanout_10000": {"400"}, "oversized": {"400"},
            "stop_flood": {"400"}}
METRIC_PREFIXES = ("press_cancelled_requests_total", "press_rejected_requests_total", "press_requests_total",
                   "press_queue_depth", "press_slots_in_use", "press_requests_in_flight", "press_engine_",
                   "press_preempted_requests_total", "press_prefill_chunks_total", "press_decode_rows_total",
                   "press_prefill_chunk_tokens_total", "press_rows_moved_total")


class Outcomes:
    """What the hostile clients got back: kind -> outcome -> count, and the refusal latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)
        self.notes: dict[str, list[str]] = collections.defaultdict(list)

    def add(self, kind: str, outcome: str, seconds: float | None = None, note: str | None = None) -> None:
        with self.lock:
            self.counts[kind][outcome] += 1
            if seconds is not None:
                self.seconds[kind].append(seconds)
            if note and outcome not in EXPECTED[kind] and len(self.notes[kind]) < 3:
                self.notes[kind].append(f"{outcome}: {note}"[:300])

    def report(self) -> dict:
        out = {}
        for kind in EXPECTED:
            if kind not in self.counts:
                continue
            counts = self.counts[kind]
            entry = {"outcomes": dict(counts),
                     "unexpected": sum(n for o, n in counts.items() if o not in EXPECTED[kind])}
            if self.seconds.get(kind):
                entry["answer_s_p50"] = statistics.median(self.seconds[kind])
                entry["answer_s_max"] = max(self.seconds[kind])
            if self.notes.get(kind):
                entry["first_unexpected"] = self.notes[kind]
            out[kind] = entry
        return out


def _post(port: int, path: str, body: bytes, timeout: float) -> tuple[str, float, str]:
    """One complete request on its own connection: (status or exception name, seconds, body head)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        text = response.read().decode("utf-8", "replace")
        return str(response.status), time.perf_counter() - start, text[:300]
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__, time.perf_counter() - start, str(e)
    finally:
        conn.close()


def _raw_request(path: str, body: dict, port: int) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _status_of(received: bytes) -> str:
    parts = received.split(b" ", 2)
    return parts[1].decode("ascii", "replace") if len(parts) > 1 and received.startswith(b"HTTP/") else "garbled"


def disconnect_once(port: int, model: str, outcomes: Outcomes) -> None:
    """A non-streaming completion of 200 tokens (ignore_eos: a sampled answer that ended early would
    finish before the hang-up, and hold its row for less than a hostile client means to); hang up
    0.2 s later, before the answer."""
    request = _raw_request("/v1/completions", {"model": model, "prompt": "Tell me a long story about the sea.",
                                               "max_tokens": 200, "temperature": 0.7, "ignore_eos": True}, port)
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(request)
            s.settimeout(0.2)
            try:
                received = s.recv(4096)
            except TimeoutError:
                outcomes.add("disconnect", "hung_up")
                return
            outcomes.add("disconnect", _status_of(received) if received else "closed_by_server",
                         note=received[:300].decode("utf-8", "replace"))
    except OSError as e:
        outcomes.add("disconnect", type(e).__name__, note=str(e))


def disconnect_stream_once(port: int, model: str, outcomes: Outcomes) -> None:
    """A streaming chat completion of 200 tokens; hang up at its first server-sent event."""
    request = _raw_request("/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
        "max_tokens": 200, "temperature": 0.7, "stream": True}, port)
    try:
        with socket.create_connection((HOST, port), timeout=30) as s:
            s.sendall(request)
            received = b""
            while (b"\r\n\r\n" not in received or _status_of(received) == "200") \
                    and b"data:" not in received.partition(b"\r\n\r\n")[2]:
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
            status = _status_of(received)
            if status == "200" and b"data:" in received.partition(b"\r\n\r\n")[2]:
                outcomes.add("disconnect_stream", "hung_up_after_first_event")
            else:
                outcomes.add("disconnect_stream", status, note=received[:300].decode("utf-8", "replace"))
    except OSError as e:
        outcomes.add("disconnect_stream", type(e).__name__, note=str(e))


def fanout_body(model: str, prompts: int, max_tokens: int) -> bytes:
    return json.dumps({"model": model, "prompt": [QUESTIONS[i % len(QUESTIONS)] for i in range(prompts)],
                       "max_tokens": max_tokens, "temperature": 0.7}).encode()


def paced_loop(kind: str, attempt, stop_at: float) -> None:
    """Run attempt() every PACING[kind] seconds (from the start of one to the next) until stop_at."""
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        attempt()
        time.sleep(max(0.0, min(PACING[kind] - (time.perf_counter() - start), stop_at - time.perf_counter())))


def slowloris(port: int, connections: int, stop_at: float, outcomes: Outcomes) -> None:
    """`connections` sockets sending one header byte each per second, never finishing the request.
    A socket the server closes is counted and replaced; the rest are counted as still open at the end."""
    header = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
              "X-Slow: " + "a" * 4096).encode()  # never reaches the blank line that ends the headers
    sockets: list[tuple[socket.socket, int]] = []
    try:
        while time.perf_counter() < stop_at:
            while len(sockets) < connections:
                try:
                    sockets.append((socket.create_connection((HOST, port), timeout=5), 0))
                except OSError as e:
                    outcomes.add("slowloris", type(e).__name__, note=str(e))
                    break
            kept = []
            for s, sent in sockets:
                try:
                    s.sendall(header[sent % len(header): sent % len(header) + 1])
                    kept.append((s, sent + 1))
                except OSError as e:
                    outcomes.add("slowloris", "closed_by_server", note=f"after {sent} bytes: {e}")
                    s.close()
            sockets = kept
            time.sleep(max(0.0, min(SLOW_BYTE_SECONDS, stop_at - time.perf_counter())))
    finally:
        for s, _ in sockets:
            outcomes.add("slowloris", "still_open")
            s.close()


def hostile_threads(port: int, model: str, stop_at: float, slow: int, outcomes: Outcomes,
                    kinds=tuple(EXPECTED)) -> list[threading.Thread]:
    fan16 = fanout_body(model, 16, 64)
    fan10k = fanout_body(model, 10_000, 16)
    oversized = json.dumps({"model": model, "prompt": "lorem ipsum " * (OVERSIZED_CHARS // 12),
                            "max_tokens": 16}).encode()
    stop_flood = json.dumps({"model": model, "prompt": QUESTIONS[0], "max_tokens": 16,
                             "stop": [f"stop word {i}" for i in range(STOP_FLOOD)]}).encode()

    def complete(kind: str, body: bytes, timeout: float):
        def attempt():
            status, seconds, text = _post(port, "/v1/completions", body, timeout)
            outcomes.add(kind, status, seconds, note=text)
        return attempt

    loops = {
        "disconnect": lambda: disconnect_once(port, model, outcomes),
        "disconnect_stream": lambda: disconnect_stream_once(port, model, outcomes),
        "fanout_16": complete("fanout_16", fan16, 300),
        "fanout_10000": complete("fanout_10000", fan10k, 60),
        "oversized": complete("oversized", oversized, 60),
        "stop_flood": complete("stop_flood", stop_flood, 60),
    }
    threads = [threading.Thread(target=paced_loop, args=(kind, attempt, stop_at), name=f"hostile-{kind}")
               for kind, attempt in loops.items() if kind in kinds]
    if "slowloris" in kinds:
        threads.append(threading.Thread(target=slowloris, args=(port, slow, stop_at, outcomes),
                                        name="hostile-slowloris"))
    return threads


def well_behaved_clients(client, model: str, clients: int, seconds: float, max_tokens: int, extra=()) -> dict:
    """`clients` openai clients looping over chat requests for `seconds`, beside the `extra` threads
    (started with them and joined after them): their latencies, errors and wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}],
                    max_tokens=max_tokens, temperature=0.7, seed=i * 1000 + n)
                with lock:
                    latencies.append(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
            n += 1

    begin = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,), name=f"well-behaved-{i}") for i in range(clients)]
    for t in (*threads, *extra):
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    for t in extra:
        t.join()
    return {"seconds": wall, "latencies": latencies, "errors": errors}


def phase_summary(segments: list[dict]) -> dict:
    """One phase's figures over its segments (latencies pooled)."""
    latencies = [x for seg in segments for x in seg["latencies"]]
    errors = [e for seg in segments for e in seg["errors"]]
    wall = sum(seg["seconds"] for seg in segments)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    return {"seconds": wall, "segments": len(segments), "requests": len(latencies),
            "requests_per_s": len(latencies) / wall, "errors": len(errors), "first_errors": errors[:5],
            "latency_p50_s": statistics.median(latencies) if latencies else None, "latency_p95_s": q[18]}


def counter_values(lines: list[str]) -> dict[str, float]:
    """The metrics lines as {name with labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines}


def drain(url: str, seconds: float = 30) -> list[str]:
    """Wait until no row is in use and nothing is queued (cancelled and finished rows freed), at
    most `seconds`; the metrics lines then."""
    deadline = time.time() + seconds
    while (lines := metrics_lines(url)) and time.time() < deadline and not all(
            line.endswith(" 0.0") for line in lines if line.startswith(("press_slots", "press_queue"))):
        time.sleep(0.5)
    return lines


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) the server process and this one (the clients) have spent so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    ticks = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (int(fields[11]) + int(fields[12])) / ticks, own.user + own.system


def metrics_lines(url: str) -> list[str]:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return [line for line in text.splitlines() if line.startswith(METRIC_PREFIXES)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--well-behaved", type=int, default=8, help="well-behaved clients in both phases")
    parser.add_argument("--seconds", type=float, default=60, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=2,
                        help="segments each phase is run in, the phases alternating (baseline first)")
    parser.add_argument("--max-slots", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32, help="of each well-behaved request")
    parser.add_argument("--slow", type=int, default=4, help="slowloris connections")
    parser.add_argument("--kinds", default=",".join(EXPECTED),
                        help="the hostile kinds to run, comma-separated (default: all of them)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a press serve setting (e.g. prefill_delay=1.0); repeatable")
    parser.add_argument("--out", default="bench-results/hostile.json")
    args = parser.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := set(kinds) - set(EXPECTED):
        parser.error(f"--kinds: unknown {sorted(unknown)}; the kinds are {', '.join(EXPECTED)}")

    import openai

    port = free_port()
    url = f"http://{HOST}:{port}"
    server_log = tempfile.TemporaryFile("w+")  # read at the end: tracebacks the hostile clients caused
    server = start_server(args.model, port, args.max_slots, args.set, stderr=server_log, host=HOST)
    try:
        log(f"hostile_clients: starting press serve on {url} (--warmup compiles once, then loads from cache)")
        wait_ready(url, server)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        log("hostile_clients: warm-up")
        warm = [threading.Thread(target=lambda: client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=args.max_tokens,
            temperature=0)) for _ in range(args.well_behaved)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        # The phases alternate in --rounds segments each, so a drift in the machine's own speed
        # (another tenant's load) falls on both alike.
        outcomes = Outcomes()
        segments: dict[str, list[dict]] = {"baseline": [], "hostile": []}
        engine_work: dict[str, dict[str, float]] = {"baseline": {}, "hostile": {}}
        cpu: dict[str, dict[str, float]] = {"baseline": {}, "hostile": {}}  # CPU seconds each process spent
        part = args.seconds / args.rounds
        before = counter_values(metrics_lines(url))
        for r in range(args.rounds):
            for phase in ("baseline", "hostile"):
                log(f"hostile_clients: {phase} {r + 1}/{args.rounds}, {args.well_behaved} well-behaved clients"
                    f"{' beside hostile ones' if phase == 'hostile' else ''} for {part:g} s")
                extra = (hostile_threads(port, args.model, time.perf_counter() + part, args.slow, outcomes, kinds)
                         if phase == "hostile" else ())
                cpu_before = cpu_seconds(server.pid)
                segments[phase].append(well_behaved_clients(client, args.model, args.well_behaved, part,
                                                            args.max_tokens, extra))
                for who, (start, end) in zip(("server", "clients"), zip(cpu_before, cpu_seconds(server.pid))):
                    cpu[phase][who] = cpu[phase].get(who, 0.0) + end - start
                lines = drain(url)
                after = counter_values(lines)
                for name, value in after.items():  # what the engine did in this phase's segments
                    if name.startswith(("press_engine_", "press_decode_rows", "press_prefill_chunk", "press_rows_moved")):
                        engine_work[phase][name] = engine_work[phase].get(name, 0.0) + value - before.get(name, 0.0)
                before = after
        client.close()
        baseline, hostile = phase_summary(segments["baseline"]), phase_summary(segments["hostile"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.seek(0)
        stderr = server_log.read()
        server_log.close()
        if server.returncode not in (0, -15):
            log(f"hostile_clients: press serve exited with {server.returncode}:\n{stderr[-3000:]}")

    ratio = (hostile["latency_p95_s"] / baseline["latency_p95_s"]
             if hostile["latency_p95_s"] and baseline["latency_p95_s"] else None)
    result = {
        "model": args.model,
        "well_behaved_clients": args.well_behaved,
        "seconds_per_phase": args.seconds,
        "rounds": args.rounds,
        "max_slots": args.max_slots,
        "serve_settings": args.set,
        "max_tokens": args.max_tokens,
        "baseline": baseline,
        "with_hostile": hostile,
        "well_behaved_p50_with_hostile_over_without": (hostile["latency_p50_s"] / baseline["latency_p50_s"]
                                                       if hostile["latency_p50_s"] and baseline["latency_p50_s"]
                                                       else None),
        "well_behaved_p95_with_hostile_over_without": ratio,
        "goal": f"well-behaved p95 ratio <= {P95_GOAL} and no well-behaved error",
        "goal_met": ratio is not None and ratio <= P95_GOAL and not baseline["errors"] and not hostile["errors"],
        "hostile": outcomes.report(),
        "hostile_kinds": list(kinds),
        "engine_by_phase": engine_work,
        "cpu_seconds_by_phase": cpu,
        "metrics": lines,
        "server_tracebacks": stderr.count("Traceback (most recent call last)"),
        "server_exit": server.returncode,
    }
    write_result(args.out, result)
    if baseline["errors"] or hostile["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
