"""What a speculative step's check costs against a plain decode step, by the tokens it checks.

A speculative step runs the target once over K + 1 tokens a row ([last token, d1 .. dK]) where a
plain step runs it over one, so it pays only when its rows gain, on average, more tokens than
the check costs plain steps. This times the engine's own jitted programs (serve/engine.py
`_check`, a lookup draft's step, and `_decode`) on SmolLM2-135M-Instruct (or `--target`), in an
engine of each `--slots` rows with a lookup draft of the largest K (so its weights are stored
as that engine stores them: tiled for steps of at most TILED_ROWS rows), every row busy, 64
attended slots, greedy; the median of `--repeats` calls after two calls of each shape (the first
compiles it), the shapes called in turn round by round. Reported: milliseconds per call, and each check's cost in plain steps: the tokens
per target pass a draft must reach to pay.

  .venv/bin/python benchmarks/check_cost.py [--target DIR] [--slots 1,2,4] [--tokens 1,2,3,4]
      [--repeats 9] [--float-table-slots N] [--out bench-results/check-cost.json]

--float-table-slots sets the engine widths up to which a tied float32 table is the head's kernel
(serve/engine.py FLOAT_TABLE_SLOTS; 0: XLA's dot at every width), to compare the two heads.
"""

from __future__ import annotations

import argparse
import statistics

from common import check_step_seconds, decode_step_seconds, log, write_result

WIDTH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--slots", default="1,2,4", help="engines of these many rows, every row busy")
    parser.add_argument("--tokens", default="1,2,3,4", help="draft tokens K a check takes a row (it runs K + 1)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--float-table-slots", type=int, default=None,
                        help="engines of up to this many rows read a tied float32 table on the kernel")
    parser.add_argument("--out", default="bench-results/check-cost.json")
    args = parser.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    tokens = [int(k) for k in args.tokens.split(",")]

    from serve import engine as engine_lib
    from serve.engine import Engine

    if args.float_table_slots is not None:
        engine_lib.FLOAT_TABLE_SLOTS = args.float_table_slots
    result = {"target": args.target, "width": WIDTH, "repeats": args.repeats,
              "float_table_slots": engine_lib.FLOAT_TABLE_SLOTS, "engines": []}
    for rows in slots:
        with Engine.from_pretrained(args.target, max_slots=rows, max_seq_len=256, draft="ngram",
                                    draft_tokens=max(tokens), draft_max_rows=rows) as engine:
            calls = {0: lambda: decode_step_seconds(engine, rows, WIDTH)}
            calls.update({k: lambda k=k: check_step_seconds(engine, rows, WIDTH, k) for k in tokens})
            for call in calls.values():  # the first compiles
                call(), call()
            times = {k: [] for k in calls}
            for _ in range(args.repeats):  # round by round, so the machine's drift falls on all alike
                for k, call in calls.items():
                    times[k].append(call())
        plain, checks = (1e3 * statistics.median(times.pop(0)),
                         {k: 1e3 * statistics.median(t) for k, t in times.items()})
        log(f"{rows} rows: plain step {plain:.1f} ms; " + ", ".join(
            f"K={k}: {ms:.1f} ms ({ms / plain:.2f} steps)" for k, ms in checks.items()))
        result["engines"].append({"rows": rows, "plain_ms": plain, "check_ms": {str(k): ms for k, ms in checks.items()},
                                  "check_in_plain_steps": {str(k): ms / plain for k, ms in checks.items()}})
    write_result(args.out, result)


if __name__ == "__main__":
    main()
