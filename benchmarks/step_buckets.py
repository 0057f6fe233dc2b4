"""What a serving decode step costs by its rows and the prompt chunk it carries, one run.

The engine's own jitted decode step (serve/engine.py `_decode`) on SmolLM2-135M-Instruct, fp32,
`--slots` slots (16), 64 attended slots, at each row count alone and with a chunk of each size; the median
of `--repeats` calls after two calls of each shape (the first compiles it). This is what `row_buckets` and
`CHUNK_SIZES` trade against compiled programs (BENCHMARKS.md, "Server under load"); it also
times `Engine.warmup` for `--warmup-slots` slots on a fresh compilation cache.

  .venv/bin/python benchmarks/step_buckets.py [--rows 8,12,16] [--chunks 8,16,32] [--repeats 7]
      [--slots 16] [--float-rows N] [--warmup-slots 32] [--out bench-results/step-buckets.json]

--float-rows sets the rows up to which float32 matmuls take the float kernel (compress/quant/matmul.py
`float_rows`, by default this CPU's) for the steps timed, to compare the two paths.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import decode_step_seconds, log, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", default="8,12,16")
    parser.add_argument("--chunks", default="8,16,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--slots", type=int, default=16, help="the engine's rows (max_slots)")
    parser.add_argument("--float-rows", type=int, default=None,
                        help="rows up to which float32 matmuls take the float kernel (default: this CPU's)")
    parser.add_argument("--warmup-slots", type=int, default=32, help="0: do not time a warmup")
    parser.add_argument("--out", default="bench-results/step-buckets.json")
    args = parser.parse_args()

    import jax
    import numpy as np

    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp())  # a fresh cache: the warmup compiles
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from compress.kernels import cpu as cpu_kernels
    from compress.quant import matmul
    from serve.engine import Engine

    if args.float_rows is not None:
        matmul.FLOAT_ROWS[cpu_kernels.instruction_set()] = args.float_rows
    result = {"model": args.model, "slots": args.slots, "width": 64, "float_rows": matmul.float_rows(),
              "instruction_set": cpu_kernels.instruction_set(), "steps_ms": {}}
    with Engine.from_pretrained(args.model, max_slots=args.slots, max_seq_len=256) as e:
        def step(rows: int, size: int | None) -> float:
            chunk = None if size is None else e._chunk(np.zeros(size, np.int32), e.max_slots, 1, 0, [])
            return decode_step_seconds(e, rows, 64, chunk)

        chunks = [int(c) for c in args.chunks.split(",") if c]
        cases = [(r, c) for r in map(int, args.rows.split(",")) for c in (None, *chunks)]
        for _ in range(2):  # the first call compiles; the first after all of them still ran slow
            for case in cases:
                step(*case)
        times = {case: [] for case in cases}
        for _ in range(args.repeats):  # the shapes alternate, so a drift in the machine's speed falls on all
            for case in cases:
                times[case].append(step(*case))
        for (rows, size), t in times.items():
            key = f"rows {rows}, " + ("no chunk" if size is None else f"chunk {size}")
            result["steps_ms"][key] = 1e3 * float(np.median(t))
            log(f"step_buckets: {key}: {result['steps_ms'][key]:.1f} ms")
    if args.warmup_slots:
        with Engine.from_pretrained(args.model, max_slots=args.warmup_slots, max_seq_len=256) as e:
            start = time.perf_counter()
            programs = e.warmup(prefix_lengths=e.chat_prefix_lengths())
            result["warmup"] = {"slots": args.warmup_slots, "programs": programs,
                                "seconds": time.perf_counter() - start}
            log(f"step_buckets: warmup of {args.warmup_slots} slots: {programs} programs in "
                f"{result['warmup']['seconds']:.1f} s")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
