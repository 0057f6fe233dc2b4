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
