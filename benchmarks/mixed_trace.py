"""Continuous batching on a mixed trace: the press engine against transformers' static batches of the same requests.

A trace of `--requests` requests, all waiting at the start (an offline job, or a burst): prompt
lengths drawn uniformly from 16-400 tokens (slices of the Python language reference, so real
text), output lengths uniformly from 8-256 tokens (exactly that many, EOS ignored), greedy.

  - press: one engine with `--slots` rows; every request is submitted at once and rows are
    refilled the moment one finishes (continuous batching, prefix cache and chunked prefill on).
  - transformers: the same requests in arrival order, `--slots` at a time; each batch is one
    `generate` call, left-padded, running until its longest output is done; every request of a
    batch finishes when the batch does (static batching, what `generate` offers).

Both run SmolLM2-135M-Instruct in float32 on the same threads. Reported: requests/s and tokens/s
over the whole trace, the p50/p95 latency of a request (from the start to its last token), and
the ratios press over transformers. `--scheme` also runs press on a `press quantize` directory
(e.g. w8a8, int8+embed-int8) in the same run.

  .venv/bin/python benchmarks/mixed_trace.py [--requests 64] [--slots 16] [--seed 0] [--schemes int8+embed-int8]
      [--out bench-results/mixed-trace.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from common import log, write_result


def trace(tokenizer, requests: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, the prompts cut from the language reference."""
    from compress.data import pydoc_split

    text = pydoc_split()[0]
    ids = tokenizer(text[:2_000_000])["input_ids"]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        length, new = int(rng.integers(16, 401)), int(rng.integers(8, 257))
        start = int(rng.integers(0, len(ids) - length))
        out.append((ids[start : start + length], new))
    return out


def percentiles(latencies: list[float]) -> dict:
    q = statistics.quantiles(latencies, n=20)
    return {"latency_p50_s": statistics.median(latencies), "latency_p95_s": q[18]}


def bench_press(model: str, requests: list, slots: int) -> dict:
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    with Engine.from_pretrained(model, max_slots=slots, max_seq_len=1024) as engine:
        engine.warmup(prompt_lengths=(16, 32, 64, 128, 256, 512))
        engine.generate([list(requests[0][0])] * 2, SamplingParams(max_new_tokens=4, ignore_eos=True))
        start = time.perf_counter()
        submitted = [engine.submit(ids, SamplingParams(max_new_tokens=new, ignore_eos=True)) for ids, new in requests]
        outputs = [r.result() for r in submitted]
        wall = time.perf_counter() - start
    assert all(len(o.token_ids) == new for o, (_, new) in zip(outputs, requests)), "a request stopped early"
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"seconds": wall, "requests_per_s": len(requests) / wall, "generated_tokens_per_s": tokens / wall,
            **percentiles([o.total_seconds for o in outputs]), "stats": {k: engine.stats[k] for k in
                                                                          ("prefills", "prefill_chunks", "decode_steps")}}


def bench_transformers(path: str, requests: list, slots: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def run(batch):
        width = max(len(ids) for ids, _ in batch)
        tokens = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, _) in enumerate(batch):
            tokens[row, width - len(ids) :] = torch.tensor(ids)
            mask[row, width - len(ids) :] = 1
        longest = max(new for _, new in batch)
        with torch.inference_mode():
            return model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=longest,
                                  min_new_tokens=longest, do_sample=False, pad_token_id=pad)

    run(requests[:2])  # warm-up
    start = time.perf_counter()
    latencies = []
    for first in range(0, len(requests), slots):
        batch = requests[first : first + slots]
        run(batch)
        latencies += [time.perf_counter() - start] * len(batch)  # a static batch ends together
    wall = time.perf_counter() - start
    tokens = sum(new for _, new in requests)
    return {"seconds": wall, "requests_per_s": len(requests) / wall, "generated_tokens_per_s": tokens / wall,
            **percentiles(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--schemes", default="", help="comma-separated press quantize schemes also served by press")
    parser.add_argument("--work", default="out/mixed-trace")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--out", default="bench-results/mixed-trace.json")
    args = parser.parse_args()

    from compress import pretrained
    from compress.formats.registry import resolve
    from roofline import quantized_directory

    _, tokenizer = pretrained.decoder_architecture(args.model)
    requests = trace(tokenizer, args.requests, args.seed)
    result = {"model": args.model, "requests": args.requests, "slots": args.slots, "seed": args.seed,
              "prompt_tokens": sum(len(ids) for ids, _ in requests), "output_tokens": sum(n for _, n in requests),
              "press": {}}
    for scheme in ["fp32", *filter(None, args.schemes.split(","))]:
        log(f"mixed_trace: press {scheme}")
        result["press"][scheme] = bench_press(quantized_directory(args.model, scheme, args.work), requests, args.slots)
    if not args.no_transformers:
        log("mixed_trace: transformers, static batches")
        result["transformers_fp32"] = hf = bench_transformers(resolve(args.model).path, requests, args.slots,
                                                             args.threads)
        fp32 = result["press"]["fp32"]
        result["ratios"] = {
            "requests_per_s_press_fp32_over_transformers_fp32": fp32["requests_per_s"] / hf["requests_per_s"],
            "p95_latency_transformers_fp32_over_press_fp32": hf["latency_p95_s"] / fp32["latency_p95_s"],
        }
    for scheme, entry in result["press"].items():
        if scheme != "fp32":
            result.setdefault("ratios", {})[f"tokens_per_s_press_{scheme}_over_press_fp32"] = (
                entry["generated_tokens_per_s"] / result["press"]["fp32"]["generated_tokens_per_s"])
    write_result(args.out, result)


if __name__ == "__main__":
    main()
