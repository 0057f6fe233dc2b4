"""Batch-1 decode at equal bits against llama.cpp, and both against this machine's memory bandwidth.

A batch-1 decode step reads every weight once, so bytes per token over seconds per token is
the rate the weights stream at; the machine's own streaming rate is the roof. One run measures:

  - bandwidth: a 1 GiB buffer read (a vectorised max) and copied by 1..N threads, the best of 5;
    and the read rate on N threads again just before and just after each engine's timed run
    (best of 3 each): another tenant can take a third of it within minutes, so each engine's
    `share_of_adjacent_roof` is against the mean of those two, `share_of_roof` against the first;
  - press: each scheme's directory written by `press quantize` (made here if missing; `fp32` and
    `bf16` are the model itself with float32 or bfloat16 weights), batch 1
    through the engine, 8 prompts x `--new-tokens` tokens each, EOS ignored, greedy;
  - llama.cpp (llama-cpp-python, the same thread count): the bundled Q4_1 file, and Q8_0 written
    from it by llama.cpp's own quantizer (`llama_model_quantize`), the same prompts and lengths.

Pairs at equal bits: press `int8+embed-int8` with llama.cpp Q8_0 (8-bit weights, table and head
included); press `int4-g32-asym+embed-int4-g32-asym` with Q4_1 (4-bit groups of 32 with a
scale and an offset, the format the bundled weights came in).

Bytes per token: press, every array of the layers and the head (a tied table read whole as the
head), one embedding row, and the KV cache slots a step attends over (the engine's bucketed
width); llama.cpp, every tensor of its file but the token table when an output tensor exists
(SmolLM2 ties them, so the table is the head), and its f16 cache over the context so far.

  .venv/bin/python benchmarks/roofline.py [--threads 2] [--new-tokens 128] [--prompts 8]
      [--schemes fp32,bf16,int8,int8+embed-int8,int4-g32-asym+embed-int4-g32-asym] [--work out/roofline]
      [--out bench-results/roofline.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from common import log, write_result
from decode import PROMPTS

# press's scheme and llama.cpp's type at the same bits; w4a8 and w8a8-g32 also round their activations
# as Q4_1's and Q8_0's dot products do (to 8 bits per group of 32: Q8_1, Q8_0).
PAIRS = {"int8+embed-int8": "Q8_0", "w8a8-g32+embed-int8": "Q8_0", "int4-g32-asym+embed-int4-g32-asym": "Q4_1",
         "w4a8-g32-asym+embed-int4-g32-asym": "Q4_1"}
FLOAT = {"fp32": None, "bf16": "bfloat16"}  # the model itself, its weights in this dtype (computed in float32)
LLAMA_FTYPES = {"Q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0


def bandwidth(threads: int, gib: float = 1.0) -> dict:
    """Streaming read (max) and copy (bytes read + written) rates of a buffer far larger than the
    caches, GB/s, best of 5."""
    data = np.ones(int(gib * 2**30) // 8, np.float64)
    out = np.empty_like(data)
    result = {}
    for n in range(1, threads + 1):
        bounds = _bounds(data.size, n)
        with concurrent.futures.ThreadPoolExecutor(n) as pool:  # numpy releases the GIL in both loops
            copy = _best(pool, lambda b: np.copyto(out[b[0] : b[1]], data[b[0] : b[1]]), bounds, 5)
        result[n] = {"read_GB_s": read_roof(n, gib, 5), "copy_GB_s": 2 * data.nbytes / copy / 1e9}
    return result


def _bounds(size: int, parts: int) -> list[tuple[int, int]]:
    return [(c[0], c[-1] + 1) for c in np.array_split(np.arange(size), parts)]


def _best(pool, fn, bounds, repeats: int) -> float:
    """The fastest of `repeats` rounds of fn over every bound on the pool, seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        list(pool.map(fn, bounds))
        best = min(best, time.perf_counter() - start)
    return best


def read_roof(threads: int, gib: float = 1.0, repeats: int = 3) -> float:
    """The streaming read rate (GB/s) of `threads` threads over a buffer far larger than the caches
    (a vectorised max is memory-bound; a sum is not)."""
    data = np.ones(int(gib * 2**30) // 8, np.float64)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # numpy releases the GIL
        seconds = _best(pool, lambda b: data[b[0] : b[1]].max(), _bounds(data.size, threads), repeats)
    return data.nbytes / seconds / 1e9


def adjacent_share(entry: dict, before: float, after: float) -> dict:
    """`entry` (with achieved_GB_s) with the roof read just before and after its timed run, and its share of their mean."""
    entry["adjacent_roof_GB_s"] = {"before": before, "after": after}
    entry["share_of_adjacent_roof"] = entry["achieved_GB_s"] / ((before + after) / 2)
    return entry


def press_bytes_per_token(params, config, widths: list[int], kv_itemsize: int) -> dict:
    """What one decode step reads: weights (the table as the head when tied; one row otherwise) and
    the KV cache over each step's attended width, averaged over the steps."""
    import jax

    leaves = lambda tree: [a for a in jax.tree.leaves(tree) if hasattr(a, "nbytes")]  # noqa: E731
    weights = sum(a.nbytes for name, tree in params.items() if name != "embed" for a in leaves(tree))
    table = sum(a.nbytes for a in leaves(params["embed"]))
    weights += table if config.tie_word_embeddings else table // config.vocab_size  # the head, or one row
    per_slot = 2 * config.num_layers * config.num_kv_heads * config.head_dim * kv_itemsize
    return {"weights": weights, "kv_cache": per_slot * statistics.mean(widths)}


def bench_press(directory: str, prompts: list[str], new_tokens: int, threads: int, param_dtype=None) -> dict:
    from compress import pretrained
    from compress.kernels import cpu as cpu_kernels
    from serve.engine import MIN_SEQ_BUCKET, Engine, power_of_two_at_least
    from serve.sampling import SamplingParams

    model = pretrained.load_decoder(directory, param_dtype=param_dtype or "float32")  # computed in float32
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    with Engine(model.params, model.config, model.tokenizer, max_slots=1, max_seq_len=512, name=directory) as engine:
        engine.warmup(prompt_lengths=(16, 32))
        engine.generate(prompts[0], SamplingParams(max_new_tokens=8, ignore_eos=True))  # the first decode's shapes
        before = read_roof(threads)
        outs = [engine.generate(p, sampling)[0] for p in prompts]
        after = read_roof(threads)
    speeds = [o.decode_tokens_per_second for o in outs]
    widths = [power_of_two_at_least(len(o.prompt_token_ids) + i + 1, MIN_SEQ_BUCKET) for o in outs
              for i in range(1, new_tokens)]
    per_token = press_bytes_per_token(model.params, model.config, widths, 4)
    rate = statistics.mean(speeds)
    return adjacent_share({"decode_tokens_per_s": rate, "per_prompt": speeds, "bytes_per_token": per_token,
                           "achieved_GB_s": (per_token["weights"] + per_token["kv_cache"]) * rate / 1e9,
                           "kernels": cpu_kernels.status()}, before, after)


def llama_q8_0(source: str, work: str) -> str:
    """A Q8_0 copy of the GGUF written by llama.cpp's own quantizer (once)."""
    import llama_cpp

    path = os.path.join(work, "smollm2-q8_0.gguf")
    if not os.path.exists(path):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPES["Q8_0"]
        params.allow_requantize = True  # the bundled file is Q4_1: its values land exactly on the 8-bit grid
        tmp = path + ".tmp"
        if llama_cpp.llama_model_quantize(source.encode(), tmp.encode(), params):
            raise RuntimeError(f"llama_model_quantize {source} -> Q8_0 failed")
        os.replace(tmp, path)
    return path


def gguf_bytes_per_token(path: str, contexts: list[int]) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: int(t.n_bytes) for t in reader.tensors}
    weights = sum(n for name, n in tensors.items() if name != "token_embd.weight" or "output.weight" not in tensors)
    field = lambda key: int(reader.fields[key].parts[-1][0])  # noqa: E731
    arch = "llama"
    layers, kv_heads = field(f"{arch}.block_count"), field(f"{arch}.attention.head_count_kv")
    head_dim = field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count")
    per_slot = 2 * layers * kv_heads * head_dim * 2  # f16 keys and values
    return {"weights": weights, "kv_cache": per_slot * statistics.mean(contexts)}


def bench_llama_cpp(path: str, prompts: list[str], new_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)

    def run(prompt: str) -> tuple[float, int]:
        tokens = llm.tokenize(prompt.encode())
        llm.reset()
        first = None
        for n, _ in enumerate(llm.generate(tokens, temp=0.0, top_k=1), start=1):
            first = first or time.perf_counter()
            if n == new_tokens:
                break
        return (new_tokens - 1) / (time.perf_counter() - first), len(tokens)

    run(prompts[0])  # warm-up
    before = read_roof(threads)
    results = [run(p) for p in prompts]
    after = read_roof(threads)
    speeds = [r[0] for r in results]
    contexts = [n + i for _, n in results for i in range(1, new_tokens)]
    per_token = gguf_bytes_per_token(path, contexts)
    rate = statistics.mean(speeds)
    return adjacent_share({"decode_tokens_per_s": rate, "per_prompt": speeds, "bytes_per_token": per_token,
                           "achieved_GB_s": (per_token["weights"] + per_token["kv_cache"]) * rate / 1e9}, before, after)


def quantized_directory(model: str, scheme: str, work: str) -> str:
    if scheme in FLOAT:
        return model
    out = os.path.join(work, f"{model}-{scheme}")
    if not os.path.exists(os.path.join(out, "config.json")):
        press = os.path.join(os.path.dirname(sys.executable), "press")
        subprocess.run([press, "quantize", "--model", model, "--scheme", scheme, "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--schemes", default="fp32,bf16,int8," + ",".join(PAIRS))
    parser.add_argument("--no-llama-cpp", action="store_true")
    parser.add_argument("--work", default="out/roofline")
    parser.add_argument("--out", default="bench-results/roofline.json")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    prompts = PROMPTS[: args.prompts]

    from compress.formats.registry import resolve

    log(f"roofline: memory bandwidth, 1..{args.threads} threads")
    result = {"model": args.model, "threads": args.threads, "new_tokens": args.new_tokens, "prompts": len(prompts),
              "bandwidth": bandwidth(args.threads)}
    roof = max(b["read_GB_s"] for b in result["bandwidth"].values())
    result["roof_read_GB_s"] = roof
    result["press"] = {}
    for scheme in args.schemes.split(","):
        log(f"roofline: press {scheme}")
        directory = quantized_directory(args.model, scheme, args.work)
        entry = bench_press(directory, prompts, args.new_tokens, args.threads, FLOAT.get(scheme))
        entry["share_of_roof"] = entry["achieved_GB_s"] / roof
        result["press"][scheme] = entry
    if not args.no_llama_cpp:
        source = resolve(args.model).path
        result["llama_cpp"] = {}
        for name, path in (("Q4_1", source), ("Q8_0", llama_q8_0(source, args.work))):
            log(f"roofline: llama.cpp {name}")
            entry = bench_llama_cpp(path, prompts, args.new_tokens, args.threads)
            entry["share_of_roof"] = entry["achieved_GB_s"] / roof
            result["llama_cpp"][name] = entry
        result["ratios"] = {
            f"press_{scheme}_over_llama_cpp_{llama}": result["press"][scheme]["decode_tokens_per_s"]
            / result["llama_cpp"][llama]["decode_tokens_per_s"]
            for scheme, llama in PAIRS.items() if scheme in result["press"]
        }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
