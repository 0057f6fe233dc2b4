"""Time to the first token of a one-slot engine, its weights tiled or in rows.

An engine whose steps carry at most serve/engine.py TILED_ROWS rows (`press generate`, `press eval`)
stores its projections in the CPU kernels' tiled layout (compress/quant/matmul.py `tile`): batch-1
decode streams them in order. A prefill's rows go to XLA's dot instead, which first undoes the
tiling with a copy of every layer. This times what that copy costs: one process, one engine per
layout (`PRESS_TILED_WEIGHTS` set while each is built), each prompt length timed in turn on both,
round after round, so the machine's drift falls on both alike. A request is one prompt and one
new token, greedy, the prefix cache off (each prompt is prefilled whole every time). Reported per
length: the median seconds of each layout and tiled over rows.

  .venv/bin/python benchmarks/first_token.py [--model smollm2-135m-instruct] [--lengths 32,100,300]
      [--rounds 5] [--out bench-results/first-token.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import log, write_result

LAYOUTS = {"tiled": "1", "rows": "0"}  # PRESS_TILED_WEIGHTS while the engine is built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a bundled name, directory or GGUF file")
    parser.add_argument("--lengths", default="32,100,300", help="prompt lengths in tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench-results/first-token.json")
    args = parser.parse_args()

    from pydoc_data.topics import topics

    from serve.engine import Engine
    from serve.sampling import SamplingParams

    engines = {}
    for layout, switch in LAYOUTS.items():
        before = os.environ.get("PRESS_TILED_WEIGHTS")
        os.environ["PRESS_TILED_WEIGHTS"] = switch
        try:
            engines[layout] = Engine.from_pretrained(args.model, max_slots=1, max_seq_len=1024, prefix_cache_blocks=0)
        finally:
            os.environ.pop("PRESS_TILED_WEIGHTS") if before is None else os.environ.update(PRESS_TILED_WEIGHTS=before)
        spec = engines[layout].params["layers"]["up"].get("spec")
        log(f"first_token: {layout}: up projection {type(spec).__name__}, tiled={getattr(spec, 'tiled', False)}")
    tokenizer = engines["tiled"].tokenizer
    ids = tokenizer.encode(" ".join(topics[name] for name in sorted(topics)))
    params = SamplingParams(max_new_tokens=1)
    prompts = {n: tokenizer.decode(ids[1000 : 1000 + n]) for n in (int(n) for n in args.lengths.split(","))}
    times = {layout: {n: [] for n in prompts} for layout in engines}
    for engine in engines.values():  # compile every prefill shape first
        engine.generate(list(prompts.values()), params)
    for r in range(args.rounds):
        for n, prompt in prompts.items():
            for layout, engine in engines.items():
                start = time.perf_counter()
                engine.generate(prompt, params)
                times[layout][n].append(time.perf_counter() - start)
        log(f"first_token: round {r + 1} of {args.rounds}")
    results = {}
    for n in prompts:
        median = {layout: statistics.median(times[layout][n]) for layout in engines}
        results[n] = {"seconds": median, "tiled_over_rows": median["tiled"] / median["rows"]}
        log(f"first_token: {n} tokens: tiled {median['tiled'] * 1e3:.1f} ms, rows {median['rows'] * 1e3:.1f} ms "
            f"({results[n]['tiled_over_rows']:.2f}x)")
    for engine in engines.values():
        engine.close()
    write_result(args.out, {"model": args.model, "rounds": args.rounds, "prompt_tokens": results})


if __name__ == "__main__":
    main()
