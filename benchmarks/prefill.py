"""Prefill throughput (batch x prompt tokens through the whole model) and model load time.

press (JAX) and transformers (PyTorch) run the same SmolLM2 weights, fp32, same
tokens, same threads, in one process, each warmed up once before it is timed; the figure that
matters is the ratio, prefill_press_fp32_over_transformers_fp32 (press's tokens/s over transformers').

  .venv/bin/python benchmarks/prefill.py [--batch 4] [--length 512] [--repeats 5] [--out bench-results/prefill.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import write_result


def time_load(model: str, cold: bool) -> float:
    """Seconds from a fresh process's call to load_decoder until the parameters are on device."""
    code = (
        "import time, jax; t=time.perf_counter(); from compress.pretrained import load_decoder; "
        f"m=load_decoder({model!r}); jax.block_until_ready(m.params); print(time.perf_counter()-t)"
    )
    env = dict(os.environ)
    if cold:
        env["PRESS_CACHE_DIR"] = os.path.join("bench-results", "cold-cache")
        shutil.rmtree(env["PRESS_CACHE_DIR"], ignore_errors=True)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def best_of(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (compilation for press, allocator warm-up for torch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench-results/prefill.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from compress.models import decoder
    from compress.pretrained import load_decoder

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    load_cold = time_load(args.model, cold=True)
    load_warm = time_load(args.model, cold=False)

    ours = load_decoder(args.model)
    tokens = np.random.default_rng(0).integers(0, ours.config.vocab_size, (args.batch, args.length))
    forward = jax.jit(lambda p, t: decoder.forward(p, t, ours.config).logits)
    tokens_jax = jnp.asarray(tokens)
    press_best, press_median = best_of(lambda: forward(ours.params, tokens_jax).block_until_ready(), args.repeats)

    path = ours.location.path
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    tokens_torch = torch.tensor(tokens)

    def torch_prefill():
        with torch.inference_mode():
            ref(tokens_torch, use_cache=False)

    torch_best, torch_median = best_of(torch_prefill, args.repeats)
    n = args.batch * args.length
    result = {
        "model": args.model,
        "batch": args.batch,
        "length": args.length,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "press_tokens_per_s": n / press_best,
        "transformers_tokens_per_s": n / torch_best,
        "press_median_s": press_median,
        "transformers_median_s": torch_median,
        "prefill_press_fp32_over_transformers_fp32": torch_best / press_best,
        "load_seconds_cold_tokenizer_cache": load_cold,
        "load_seconds_warm": load_warm,
        "jax": jax.__version__,
        "torch": torch.__version__,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
