"""What every benchmark script shares: progress lines, writing its results, timing a jitted call."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time


def log(line: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(line, file=sys.stderr, flush=True)


def write_result(path: str, result: dict) -> None:
    """The results as JSON at `path` (folders made as needed) and on stdout."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, indent=2, default=str))


def median_seconds(fn, args: tuple, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn(*args) (a jitted function: one warm-up call
    first, each call waited for)."""
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_step_seconds(engine, rows: int, width: int, chunk=None) -> float:
    """The wall time of one call of the engine's jitted decode step (serve/engine.py `_decode`)
    over `rows` of its slots, attending `width` slots, with a prompt chunk (`engine._chunk`) or
    none: every slot at token 0, greedy. Timing only: the cache it writes is the engine's own,
    and the tokens it returns are waited for, not used."""
    import numpy as np

    e = engine
    zeros = lambda dtype: np.zeros(e.max_slots, dtype)  # noqa: E731
    start = time.perf_counter()
    nxt, e._cache, e._pool = e._decode(e.params, e._cache, e._pool, zeros(np.int32), zeros(np.uint32), zeros(np.int32),
                                       zeros(np.float32), zeros(np.int32), np.ones(e.max_slots, np.float32), rows,
                                       width, None, chunk)
    np.asarray(nxt)
    return time.perf_counter() - start


def check_step_seconds(engine, rows: int, width: int, k: int) -> float:
    """The wall time of one call of an engine's jitted lookup check (serve/engine.py `_check`):
    `rows` of its slots each checking k draft tokens after its last one, attending `width` slots,
    greedy; as decode_step_seconds, for timing only."""
    import numpy as np

    e = engine
    zeros = lambda dtype: np.zeros(e.max_slots, dtype)  # noqa: E731
    start = time.perf_counter()
    tokens, _, e._cache = e._check(e.params, e._cache, zeros(np.int32), np.zeros((e.max_slots, k), np.int32),
                                   zeros(np.uint32), zeros(np.int32), zeros(np.float32), zeros(np.int32),
                                   np.ones(e.max_slots, np.float32), rows, width)
    np.asarray(tokens)
    return time.perf_counter() - start
