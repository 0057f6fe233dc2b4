"""Load test of `press serve` on loopback: N concurrent openai clients for a fixed time.

The server runs in its own process (`press serve`), the clients here, each looping over
chat requests until the time is up. Every request must be answered without error; the
figures are requests/s, generated tokens/s and latency percentiles.

  .venv/bin/python benchmarks/server_load.py [--clients 32] [--seconds 60] [--max-tokens 32] [--prefix-cache-blocks 256]
                                            [--out bench-results/server.json]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

from common import write_result

QUESTIONS = [
    "What is the capital of Japan?",
    "Give me a synonym for happy.",
    "What is 7 times 8?",
    "Name a planet in the solar system.",
    "What colour is a ripe banana?",
    "Write one sentence about the ocean.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"press serve exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("press serve did not become ready")


def start_server(model: str, port: int, max_slots: int, settings: list[str], stderr, host: str = "127.0.0.1"):
    """`press serve` on loopback as its own process (--warmup: shapes compiled before it listens)."""
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "press"), "serve", "--model", model, "--host", host,
         "--port", str(port), "--max-slots", str(max_slots), "--max-seq-len", "256", "--warmup", *settings],
        stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--prefix-cache-blocks", type=int, default=256,
                        help="the server's prefix cache (0 switches it off, to measure what it buys)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a press serve setting (e.g. prefill_delay=1.0); repeatable")
    parser.add_argument("--out", default="bench-results/server.json")
    args = parser.parse_args()

    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, args.max_slots,
                          [f"prefix_cache_blocks={args.prefix_cache_blocks}", *args.set], stderr=subprocess.PIPE)
    try:
        wait_ready(url, server)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        # Warm-up: compile the prefill and decode buckets a full load visits.
        warm = [threading.Thread(target=lambda: client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=args.max_tokens,
            temperature=0)) for _ in range(args.clients)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()

        latencies: list[float] = []
        tokens = [0]
        errors: list[str] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def worker(i: int) -> None:
            n = 0
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    r = client.chat.completions.create(
                        model=args.model,
                        messages=[{"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}],
                        max_tokens=args.max_tokens,
                        temperature=0.7,
                        seed=i * 1000 + n,
                    )
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        tokens[0] += r.usage.completion_tokens
                except Exception as e:  # noqa: BLE001 - counted, reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                n += 1

        begin = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - begin
    finally:
        server.terminate()
        server.wait(timeout=60)

    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    result = {
        "model": args.model,
        "clients": args.clients,
        "seconds": wall,
        "max_tokens": args.max_tokens,
        "prefix_cache_blocks": args.prefix_cache_blocks,
        "serve_settings": args.set,
        "requests": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "requests_per_s": len(latencies) / wall,
        "generated_tokens_per_s": tokens[0] / wall,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": q[18],
    }
    write_result(args.out, result)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
