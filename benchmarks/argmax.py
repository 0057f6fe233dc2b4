"""Greedy sampling's argmax: the native kernel against XLA's reductions, one run.

serve/sampling.py `greedy` with native=True (compress/kernels/cpu.py `argmax`) and native=False
(two plain reductions) on SmolLM2's vocabulary of 49,152 float32 logits, jitted, the median of
`--repeats` calls at each row count; and a jitted no-op on the same input for the dispatch floor.

  .venv/bin/python benchmarks/argmax.py [--rows 1,16] [--repeats 300] [--out bench-results/argmax.json]
"""

from __future__ import annotations

import argparse

from common import log, median_seconds, write_result

VOCAB = 49152


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default="bench-results/argmax.json")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from compress.kernels import cpu as cpu_kernels
    from serve.sampling import greedy

    log(f"argmax: {cpu_kernels.status()}")
    fns = {"native": jax.jit(lambda x: greedy(x, True)), "xla": jax.jit(lambda x: greedy(x, False)),
           "no-op": jax.jit(lambda x: x[:, 0] + 1)}
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(np.random.default_rng(rows).standard_normal((rows, VOCAB), np.float32))
        entry = {"rows": rows, **{f"{name}_us": median_seconds(fn, (x,), args.repeats) * 1e6 for name, fn in fns.items()}}
        entry["xla_over_native"] = entry["xla_us"] / entry["native_us"]
        log(f"argmax: {rows} rows: native {entry['native_us']:.1f} us, xla {entry['xla_us']:.1f} us, "
            f"no-op {entry['no-op_us']:.1f} us")
        results.append(entry)
    write_result(args.out, {"vocab": VOCAB, "repeats": args.repeats, "results": results})


if __name__ == "__main__":
    main()
