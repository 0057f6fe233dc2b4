"""Load test of `press serve` on loopback: N concurrent openai clients for a fixed time.

The server runs in its own process (`press serve`), the clients here, each looping over
chat requests until the time is up. Every request must be answered without error; the
figures are requests/s, generated tokens/s and latency percentiles.

With --shared-prefix N every request starts with the same system message of about N tokens,
as a RAG deployment's does: an instruction to answer from the sources that follow, then
sections of the Python language reference (pydoc_data.topics) as the sources. That is the
traffic a prefix cache is for; without it, requests share only the chat template's default
system prompt (24 tokens of SmolLM2's ~37).

  .venv/bin/python benchmarks/server_load.py [--clients 32] [--seconds 60] [--max-tokens 32] [--prefix-cache-blocks 256]
                                            [--shared-prefix 0] [--max-seq-len 256] [--out bench-results/server.json]
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


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 900) -> None:
    """Until `press serve` answers /health. A first start on a fresh machine compiles every decode
    and prefill shape (--warmup: 110 programs in 154 s for 32 slots on 2 cores, 2026-12-02); later starts
    load them from the compilation cache."""
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


def start_server(model: str, port: int, max_slots: int, settings: list[str], stderr, host: str = "127.0.0.1",
                 max_seq_len: int = 256):
    """`press serve` on loopback as its own process (--warmup: shapes compiled before it listens)."""
    return subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "press"), "serve", "--model", model, "--host", host,
         "--port", str(port), "--max-slots", str(max_slots), "--max-seq-len", str(max_seq_len), "--warmup",
         *settings],
        stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def shared_prefix(model: str, tokens: int) -> str:
    """A RAG-style system message of about `tokens` tokens of `model`'s tokenizer: an instruction,
    then numbered sources from the Python language reference."""
    from pydoc_data.topics import topics

    from compress.formats.registry import resolve
    from compress.formats.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve(model))
    text = "Answer the question from the numbered sources below, citing each source you use as [n].\n"
    for n, name in enumerate(sorted(topics), 1):
        text += f"[{n}] {topics[name]}\n"
        if len(tokenizer(text)["input_ids"]) >= tokens:
            break
    ids = tokenizer(text)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--prefix-cache-blocks", type=int, default=256,
                        help="the server's prefix cache (0 switches it off, to measure what it buys)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="TOKENS",
                        help="every request starts with the same system message of about this many tokens (RAG)")
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a press serve setting (e.g. prefill_delay=1.0); repeatable")
    parser.add_argument("--out", default="bench-results/server.json")
    args = parser.parse_args()

    import openai

    system = [{"role": "system", "content": shared_prefix(args.model, args.shared_prefix)}] if args.shared_prefix else []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, port, args.max_slots,
                          [f"prefix_cache_blocks={args.prefix_cache_blocks}", *args.set], stderr=subprocess.PIPE,
                          max_seq_len=args.max_seq_len)
    try:
        wait_ready(url, server)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        # Warm-up: compile the prefill and decode buckets a full load visits.
        warm = [threading.Thread(target=lambda: client.chat.completions.create(
            model=args.model, messages=[*system, {"role": "user", "content": QUESTIONS[0]}], max_tokens=args.max_tokens,
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
                        messages=[*system, {"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}],
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
        "shared_prefix_tokens": args.shared_prefix,
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
