"""Decode throughput: the press engine against transformers `generate` and llama.cpp, in one run.

SmolLM2-135M-Instruct from the bundled GGUF; press and transformers run it dequantized to
fp32, llama.cpp (llama-cpp-python) runs the GGUF itself (Q4_1), with the same thread count.
Every system generates exactly `--new-tokens` tokens per prompt (EOS ignored), greedy, and is
warmed up at every batch size before it is timed: press by `Engine.warmup()`, transformers and
llama.cpp by one untimed `generate` of the same prompts. Each ratio names both sides and their
formats (press_fp32_over_transformers_fp32: press's tokens/s over transformers').

With --schemes, press also serves each scheme's directory (written by `press quantize`, made
here if missing; `bf16`: the model with bfloat16 weights) at every batch size, reported against
press fp32 in the same run: at 16-64
rows a step is bound by the matmuls, where w8a8 runs on integer dot products (AVX-512 VNNI).
With --float-xla, press fp32 also runs with its projections on XLA's dot instead of the native
float kernel (PRESS_FLOAT_KERNELS=0), as the row `fp32-xla-dot`.

  .venv/bin/python benchmarks/decode.py [--new-tokens 128] [--batches 1,16,64] [--out bench-results/decode.json]
      [--schemes int8,w8a8,int8+embed-int8] [--work out/decode] [--no-peers] [--float-xla]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import write_result

PROMPTS = [
    "Tell me a story about a dragon who learns to read.",
    "Explain how a hash table works.",
    "What are the main causes of the French Revolution?",
    "Write a haiku about autumn leaves.",
    "How do vaccines train the immune system?",
    "Describe the water cycle in simple terms.",
    "Give three tips for writing clean Python code.",
    "Why is the sky blue?",
]


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})") for i in range(batch)]


def bench_press(model: str, batches: list[int], new_tokens: int, param_dtype: str | None = None) -> dict:
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    results = {}
    for batch in batches:
        with Engine.from_pretrained(model, max_slots=batch, max_seq_len=256, param_dtype=param_dtype) as engine:
            prompts = prompts_for(batch)
            engine.warmup()  # compile every shape before timing
            start = time.perf_counter()
            outs = engine.generate(prompts, params)
            wall = time.perf_counter() - start
            tokens = sum(len(o.token_ids) for o in outs)
            results[batch] = {
                "tokens_per_s": tokens / wall,
                "wall_s": wall,
                "time_to_first_token_s": statistics.median(o.time_to_first_token for o in outs),
            }
            if batch == 1:
                single = engine.generate(prompts[:1], params)[0]
                results[batch]["time_to_first_token_s"] = single.time_to_first_token
                results[batch]["decode_tokens_per_s"] = single.decode_tokens_per_second
    return results


def bench_transformers(path: str, batches: list[int], new_tokens: int, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    directory, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.padding_side = "left"
    results = {}
    for batch in batches:
        inputs = tokenizer(prompts_for(batch), return_tensors="pt", padding=True)

        def run():
            with torch.inference_mode():
                return model.generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )

        run()  # warm-up at this batch size, as press is warmed up for it (allocator, kernels, shapes)
        start = time.perf_counter()
        out = run()
        wall = time.perf_counter() - start
        tokens = (out.shape[1] - inputs["input_ids"].shape[1]) * batch
        results[batch] = {"tokens_per_s": tokens / wall, "wall_s": wall}
    return results


def bench_llama_cpp(path: str, new_tokens: int, threads: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    tokens = llm.tokenize(PROMPTS[0].encode())

    def run() -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        first = None
        for n, _ in enumerate(llm.generate(tokens, temp=0.0, top_k=1), start=1):
            first = first or time.perf_counter()
            if n == new_tokens:
                break
        end = time.perf_counter()
        return (new_tokens - 1) / (end - first), first - start

    run()
    decode, ttft = run()
    return {"1": {"decode_tokens_per_s": decode, "time_to_first_token_s": ttft}, "quantization": "Q4_1 (the GGUF as shipped)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default="bench-results/decode.json")
    parser.add_argument("--schemes", default="", help="comma-separated press quantize schemes also served by press")
    parser.add_argument("--work", default="out/decode", help="where the schemes' directories are made")
    parser.add_argument("--no-peers", action="store_true", help="press only (no transformers or llama.cpp)")
    parser.add_argument("--float-xla", action="store_true", help="also press fp32 on XLA's dot (PRESS_FLOAT_KERNELS=0)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from compress.formats.registry import resolve
    from roofline import FLOAT, quantized_directory

    path = resolve(args.model).path
    press = bench_press(args.model, batches, args.new_tokens)
    schemes = {scheme: bench_press(quantized_directory(args.model, scheme, args.work), batches, args.new_tokens,
                                   FLOAT.get(scheme))  # bf16: the model itself with bfloat16 weights
               for scheme in filter(None, args.schemes.split(","))}
    if args.float_xla:
        os.environ["PRESS_FLOAT_KERNELS"] = "0"  # read when an engine is made (compress/quant/matmul.py native_float)
        try:
            schemes["fp32-xla-dot"] = bench_press(args.model, batches, args.new_tokens)
        finally:
            del os.environ["PRESS_FLOAT_KERNELS"]
    scheme_ratios = {f"batch{b}_press_{scheme}_over_press_fp32": r[b]["tokens_per_s"] / press[b]["tokens_per_s"]
                     for scheme, r in schemes.items() for b in batches}
    if args.no_peers:
        write_result(args.out, {"model": args.model, "new_tokens": args.new_tokens, "threads": args.threads,
                                "press": press, "press_schemes": schemes, "ratios": scheme_ratios})
        return
    hf = bench_transformers(path, batches, args.new_tokens, args.threads)
    llama = bench_llama_cpp(path, args.new_tokens, args.threads)
    result = {
        "model": args.model,
        "new_tokens": args.new_tokens,
        "threads": args.threads,
        "formats": {"press": "fp32 (the GGUF dequantized)", "transformers": "fp32 (the GGUF dequantized)",
                    "llama_cpp": "Q4_1 (the GGUF as shipped)"},
        "press": press,
        "press_schemes": schemes,
        "transformers": hf,
        "llama_cpp": llama,
        "ratios": {
            f"batch{b}_press_fp32_over_transformers_fp32": press[b]["tokens_per_s"] / hf[b]["tokens_per_s"]
            for b in batches
        } | scheme_ratios,
    }
    if 1 in batches and llama:
        result["ratios"]["batch1_decode_press_fp32_over_llama_cpp_q4_1"] = (
            press[1]["decode_tokens_per_s"] / llama["1"]["decode_tokens_per_s"]
        )
    write_result(args.out, result)


if __name__ == "__main__":
    main()
